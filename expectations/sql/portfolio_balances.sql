-- One row per wallet and balance: the plan's portfolio check with quoted identifiers.
-- The plan's version (unquoted tb.walletId, COUNT(*) over a LEFT JOIN) fails on the real
-- schema and would count balance rows as wallets. A FULL JOIN keeps a balance whose wallet
-- is gone (wallet_id IS NULL) so that an orphan shows up instead of vanishing from the sum.
SELECT w."id" AS wallet_id,
       tb."id" AS balance_id,
       tb."walletId" AS balance_wallet_id,
       tb."tokenId" AS balance_token_id,
       CASE WHEN tb."id" IS NOT NULL THEN w."id" END AS funded_wallet_id,
       t."id" AS token_id,
       tb."usdValue" AS usd_value
FROM "Wallet" w
FULL JOIN "TokenBalance" tb ON tb."walletId" = w."id"
LEFT JOIN "Token" t ON t."id" = tb."tokenId"
