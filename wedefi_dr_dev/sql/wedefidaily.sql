-- WeDefiDaily schema: the 33 models of reference/wedefidaily-schema.prisma, written by
-- hand from that Prisma file exactly as `prisma migrate` creates them on PostgreSQL.
--
-- Identifiers are quoted camelCase ("TokenBalance"."walletId"): PostgreSQL folds unquoted
-- names to lower case, so the original recovery plan's unquoted SQL
-- (`SELECT tb.walletId FROM "TokenBalance" tb`) fails on this schema with
-- `column tb.walletid does not exist`. Every query against it must quote.
--
-- Prisma's mapping: String -> TEXT (VARCHAR(n) with @db.VarChar(n)); ids are TEXT UUIDs
-- made by the Prisma client, so they have no database default; DateTime -> TIMESTAMP(3)
-- (without time zone); @default(now()) -> DEFAULT CURRENT_TIMESTAMP; @updatedAt -> NOT
-- NULL with no default (the client sets it); Decimal -> DECIMAL(65,30) unless @db.Decimal
-- says otherwise (money is DECIMAL(36,18)); Json -> JSONB. No enums, no autoincrement.
-- Primary keys are "<Table>_pkey", default unique/index names "<Table>_<cols>_key"/"_idx",
-- foreign keys "<Table>_<cols>_fkey" with the schema's ON DELETE and ON UPDATE CASCADE.
-- Layout as in a Prisma migration: tables, then indexes, then foreign keys.

-- CreateTable
CREATE TABLE "Chain" (
    "id" INTEGER NOT NULL,
    "name" TEXT NOT NULL,
    "shortName" TEXT,
    "nativeCurrencySymbol" TEXT,
    "explorerUrl" TEXT,
    "metadata" JSONB,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,

    CONSTRAINT "Chain_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "Wallet" (
    "id" TEXT NOT NULL,
    "address" VARCHAR(42) NOT NULL,
    "chainId" INTEGER NOT NULL,
    "label" TEXT,
    "metadata" JSONB,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,

    CONSTRAINT "Wallet_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "Protocol" (
    "id" TEXT NOT NULL,
    "slug" VARCHAR(64) NOT NULL,
    "name" TEXT NOT NULL,
    "chainId" INTEGER NOT NULL,
    "website" TEXT,
    "metadata" JSONB,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,

    CONSTRAINT "Protocol_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "Token" (
    "id" TEXT NOT NULL,
    "chainId" INTEGER NOT NULL,
    "address" VARCHAR(64) NOT NULL,
    "symbol" VARCHAR(64) NOT NULL,
    "name" TEXT NOT NULL,
    "decimals" INTEGER NOT NULL,
    "isNative" BOOLEAN NOT NULL DEFAULT false,
    "metadata" JSONB,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,

    CONSTRAINT "Token_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "TokenBalance" (
    "id" TEXT NOT NULL,
    "walletId" TEXT NOT NULL,
    "tokenId" TEXT NOT NULL,
    "rawBalance" TEXT NOT NULL,
    "quantity" DECIMAL(65,30) NOT NULL DEFAULT 0,
    "usdValue" DECIMAL(36,18),
    "blockNumber" BIGINT,
    "fetchedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,

    CONSTRAINT "TokenBalance_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "PriceSnapshot" (
    "id" TEXT NOT NULL,
    "tokenId" TEXT NOT NULL,
    "priceUsd" DECIMAL(36,18) NOT NULL,
    "source" VARCHAR(32) NOT NULL,
    "recordedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "PriceSnapshot_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "DigestRun" (
    "id" TEXT NOT NULL,
    "generatedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "markdownPath" TEXT,
    "htmlPath" TEXT,
    "jsonPath" TEXT,
    "portfolioTotal" DECIMAL(36,18),
    "walletsTracked" INTEGER NOT NULL,
    "actionableRewards" INTEGER NOT NULL,
    "criticalAlerts" INTEGER NOT NULL,
    "warningAlerts" INTEGER NOT NULL,
    "summary" TEXT NOT NULL,
    "metadata" JSONB,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "DigestRun_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "GovernanceLock" (
    "id" TEXT NOT NULL,
    "protocolId" TEXT NOT NULL,
    "walletId" TEXT NOT NULL,
    "lockAmount" DECIMAL(36,18) NOT NULL,
    "votingPower" DECIMAL(36,18) NOT NULL,
    "boostMultiplier" DECIMAL(36,18),
    "lockEndsAt" TIMESTAMP(3),
    "lastRefreshedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "metadata" JSONB,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,

    CONSTRAINT "GovernanceLock_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "VoteEpoch" (
    "id" TEXT NOT NULL,
    "protocolId" TEXT NOT NULL,
    "epochNumber" INTEGER,
    "startsAt" TIMESTAMP(3) NOT NULL,
    "endsAt" TIMESTAMP(3) NOT NULL,
    "snapshotAt" TIMESTAMP(3),
    "metadata" JSONB,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,

    CONSTRAINT "VoteEpoch_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "Gauge" (
    "id" TEXT NOT NULL,
    "protocolId" TEXT NOT NULL,
    "chainId" INTEGER NOT NULL,
    "address" VARCHAR(64) NOT NULL,
    "name" TEXT,
    "metadata" JSONB,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,

    CONSTRAINT "Gauge_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "Bribe" (
    "id" TEXT NOT NULL,
    "gaugeId" TEXT NOT NULL,
    "epochId" TEXT NOT NULL,
    "rewardTokenId" TEXT NOT NULL,
    "rewardAmount" DECIMAL(36,18) NOT NULL,
    "rewardValueUsd" DECIMAL(36,18),
    "totalVotes" DECIMAL(36,18),
    "roiPercentage" DECIMAL(36,18),
    "sponsorAddress" VARCHAR(64),
    "source" VARCHAR(64),
    "metadata" JSONB,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,

    CONSTRAINT "Bribe_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "VotePowerSnapshot" (
    "id" TEXT NOT NULL,
    "governanceLockId" TEXT NOT NULL,
    "epochId" TEXT,
    "votingPower" DECIMAL(36,18) NOT NULL,
    "capturedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "metadata" JSONB,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "VotePowerSnapshot_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "RewardOpportunity" (
    "id" TEXT NOT NULL,
    "protocolId" TEXT NOT NULL,
    "walletId" TEXT NOT NULL,
    "governanceLockId" TEXT,
    "tokenId" TEXT NOT NULL,
    "contextLabel" VARCHAR(128),
    "contextAddress" VARCHAR(64),
    "amount" DECIMAL(36,18) NOT NULL,
    "usdValue" DECIMAL(36,18),
    "apr" DECIMAL(36,18),
    "gasEstimateUsd" DECIMAL(36,18),
    "claimDeadline" TIMESTAMP(3),
    "source" VARCHAR(64),
    "metadata" JSONB,
    "computedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,

    CONSTRAINT "RewardOpportunity_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "RewardClaim" (
    "id" TEXT NOT NULL,
    "rewardOpportunityId" TEXT NOT NULL,
    "protocolId" TEXT NOT NULL,
    "walletId" TEXT NOT NULL,
    "tokenId" TEXT NOT NULL,
    "governanceLockId" TEXT,
    "amount" DECIMAL(36,18) NOT NULL,
    "usdValue" DECIMAL(36,18),
    "gasSpentUsd" DECIMAL(36,18),
    "transactionHash" VARCHAR(72),
    "claimedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "metadata" JSONB,

    CONSTRAINT "RewardClaim_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "GammaswapPool" (
    "id" TEXT NOT NULL,
    "protocolId" TEXT NOT NULL,
    "poolAddress" VARCHAR(64) NOT NULL,
    "baseTokenId" TEXT NOT NULL,
    "quoteTokenId" TEXT NOT NULL,
    "baseSymbol" VARCHAR(32) NOT NULL,
    "quoteSymbol" VARCHAR(32) NOT NULL,
    "tvl" DECIMAL(36,18),
    "tvlUsd" DECIMAL(36,18),
    "utilization" DECIMAL(36,18),
    "borrowRateApr" DECIMAL(36,18),
    "supplyRateApr" DECIMAL(36,18),
    "volume24h" DECIMAL(36,18),
    "feesEarned24h" DECIMAL(36,18),
    "metadata" JSONB,
    "lastSyncAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "GammaswapPool_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "GammaswapPosition" (
    "id" TEXT NOT NULL,
    "protocolId" TEXT NOT NULL,
    "poolId" TEXT NOT NULL,
    "walletId" TEXT NOT NULL,
    "assetTokenId" TEXT NOT NULL,
    "positionType" VARCHAR(32) NOT NULL,
    "notional" DECIMAL(36,18) NOT NULL,
    "debtValue" DECIMAL(36,18),
    "healthRatio" DECIMAL(36,18),
    "liquidationPrice" DECIMAL(36,18),
    "pnlUsd" DECIMAL(36,18),
    "lastSyncAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "metadata" JSONB,

    CONSTRAINT "GammaswapPosition_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "Alert" (
    "id" TEXT NOT NULL,
    "type" VARCHAR(64) NOT NULL,
    "severity" VARCHAR(16) NOT NULL,
    "title" TEXT NOT NULL,
    "description" TEXT,
    "status" VARCHAR(16) NOT NULL DEFAULT 'pending',
    "triggerAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "expiresAt" TIMESTAMP(3),
    "metadata" JSONB,
    "contextHash" TEXT NOT NULL,
    "walletId" TEXT,
    "protocolId" TEXT,
    "tokenId" TEXT,
    "rewardOpportunityId" TEXT,
    "gammaswapPositionId" TEXT,
    "riskEventId" TEXT,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,

    CONSTRAINT "Alert_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "AlertDelivery" (
    "id" TEXT NOT NULL,
    "alertId" TEXT NOT NULL,
    "channel" VARCHAR(32) NOT NULL,
    "success" BOOLEAN NOT NULL DEFAULT false,
    "metadata" JSONB,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "AlertDelivery_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "PriceThreshold" (
    "id" TEXT NOT NULL,
    "walletId" TEXT,
    "tokenId" TEXT NOT NULL,
    "thresholdType" VARCHAR(16) NOT NULL,
    "thresholdPrice" DECIMAL(36,18) NOT NULL,
    "isEnabled" BOOLEAN NOT NULL DEFAULT true,
    "lastTriggeredAt" TIMESTAMP(3),
    "metadata" JSONB,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,

    CONSTRAINT "PriceThreshold_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "Transaction" (
    "id" TEXT NOT NULL,
    "walletId" TEXT NOT NULL,
    "tokenId" TEXT NOT NULL,
    "transactionHash" VARCHAR(72) NOT NULL,
    "blockNumber" BIGINT NOT NULL,
    "transactionType" VARCHAR(32) NOT NULL,
    "amount" DECIMAL(36,18) NOT NULL,
    "priceUsd" DECIMAL(36,18),
    "gasSpentUsd" DECIMAL(36,18),
    "protocolId" TEXT,
    "fromAddress" VARCHAR(42),
    "toAddress" VARCHAR(42),
    "metadata" JSONB,
    "occurredAt" TIMESTAMP(3) NOT NULL,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,

    CONSTRAINT "Transaction_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "PortfolioSnapshot" (
    "id" TEXT NOT NULL,
    "walletId" TEXT,
    "totalUsdValue" DECIMAL(36,18) NOT NULL,
    "totalUsdValueChange24h" DECIMAL(36,18),
    "totalUsdValueChange7d" DECIMAL(36,18),
    "totalUsdValueChange30d" DECIMAL(36,18),
    "tokensTracked" INTEGER NOT NULL,
    "averageApr" DECIMAL(36,18),
    "metadata" JSONB,
    "capturedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "PortfolioSnapshot_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "PositionSnapshot" (
    "id" TEXT NOT NULL,
    "portfolioSnapshotId" TEXT NOT NULL,
    "tokenId" TEXT NOT NULL,
    "walletId" TEXT NOT NULL,
    "quantity" DECIMAL(36,18) NOT NULL,
    "usdValue" DECIMAL(36,18) NOT NULL,
    "priceUsd" DECIMAL(36,18) NOT NULL,
    "costBasisUsd" DECIMAL(36,18),
    "unrealizedPnlUsd" DECIMAL(36,18),
    "unrealizedPnlPercent" DECIMAL(36,18),
    "positionType" VARCHAR(32) NOT NULL,
    "protocolId" TEXT,
    "metadata" JSONB,

    CONSTRAINT "PositionSnapshot_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "PerformanceMetric" (
    "id" TEXT NOT NULL,
    "walletId" TEXT,
    "timeframe" VARCHAR(16) NOT NULL,
    "totalReturn" DECIMAL(36,18),
    "totalReturnPercent" DECIMAL(36,18),
    "realizedPnl" DECIMAL(36,18),
    "unrealizedPnl" DECIMAL(36,18),
    "sharpeRatio" DECIMAL(36,18),
    "maxDrawdown" DECIMAL(36,18),
    "volatility" DECIMAL(36,18),
    "winRate" DECIMAL(36,18),
    "tradesCount" INTEGER NOT NULL DEFAULT 0,
    "computedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "metadata" JSONB,

    CONSTRAINT "PerformanceMetric_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "AssetCorrelation" (
    "id" TEXT NOT NULL,
    "token1Id" TEXT NOT NULL,
    "token2Id" TEXT NOT NULL,
    "timeframe" VARCHAR(16) NOT NULL,
    "correlation" DECIMAL(10,8) NOT NULL,
    "pValue" DECIMAL(10,8),
    "sampleSize" INTEGER NOT NULL,
    "computedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "metadata" JSONB,

    CONSTRAINT "AssetCorrelation_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "ProtocolExposure" (
    "id" TEXT NOT NULL,
    "walletId" TEXT,
    "protocolId" TEXT NOT NULL,
    "totalExposureUsd" DECIMAL(36,18) NOT NULL,
    "exposurePercentage" DECIMAL(10,4) NOT NULL,
    "concentrationRisk" VARCHAR(16) NOT NULL,
    "liquidityRisk" VARCHAR(16) NOT NULL,
    "smartContractRisk" VARCHAR(16) NOT NULL,
    "overallRiskScore" DECIMAL(5,2) NOT NULL,
    "recommendedAllocation" DECIMAL(10,4),
    "computedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "metadata" JSONB,

    CONSTRAINT "ProtocolExposure_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "VolatilityMetric" (
    "id" TEXT NOT NULL,
    "tokenId" TEXT NOT NULL,
    "walletId" TEXT,
    "timeframe" VARCHAR(16) NOT NULL,
    "volatility" DECIMAL(10,6) NOT NULL,
    "rollingVolatility" DECIMAL(10,6) NOT NULL,
    "upsideDeviation" DECIMAL(10,6),
    "downsideDeviation" DECIMAL(10,6),
    "skewness" DECIMAL(10,6),
    "kurtosis" DECIMAL(10,6),
    "beta" DECIMAL(10,6),
    "computedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "metadata" JSONB,

    CONSTRAINT "VolatilityMetric_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "ValueAtRisk" (
    "id" TEXT NOT NULL,
    "walletId" TEXT,
    "timeframe" VARCHAR(16) NOT NULL,
    "confidenceLevel" DECIMAL(5,4) NOT NULL,
    "varAmount" DECIMAL(36,18) NOT NULL,
    "varPercentage" DECIMAL(10,6) NOT NULL,
    "expectedShortfall" DECIMAL(36,18),
    "method" VARCHAR(32) NOT NULL,
    "computedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "metadata" JSONB,

    CONSTRAINT "ValueAtRisk_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "RiskAdjustedMetric" (
    "id" TEXT NOT NULL,
    "walletId" TEXT,
    "timeframe" VARCHAR(16) NOT NULL,
    "sharpeRatio" DECIMAL(10,6),
    "sortinoRatio" DECIMAL(10,6),
    "calmarRatio" DECIMAL(10,6),
    "informationRatio" DECIMAL(10,6),
    "treynorRatio" DECIMAL(10,6),
    "jensenAlpha" DECIMAL(10,6),
    "trackingError" DECIMAL(10,6),
    "benchmarkReturn" DECIMAL(10,6),
    "computedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "metadata" JSONB,

    CONSTRAINT "RiskAdjustedMetric_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "RiskEvent" (
    "id" TEXT NOT NULL,
    "walletId" TEXT,
    "eventType" VARCHAR(64) NOT NULL,
    "severity" VARCHAR(16) NOT NULL,
    "threshold" DECIMAL(36,18),
    "actualValue" DECIMAL(36,18),
    "description" TEXT NOT NULL,
    "recommendation" TEXT,
    "isActive" BOOLEAN NOT NULL DEFAULT true,
    "resolvedAt" TIMESTAMP(3),
    "metadata" JSONB,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,

    CONSTRAINT "RiskEvent_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "WalletBalanceSnapshot" (
    "id" TEXT NOT NULL,
    "digestRunId" TEXT NOT NULL,
    "walletId" TEXT NOT NULL,
    "totalUsd" DECIMAL(36,18),
    "topHoldings" JSONB NOT NULL,
    "capturedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "WalletBalanceSnapshot_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "GovernanceLockSnapshot" (
    "id" TEXT NOT NULL,
    "digestRunId" TEXT NOT NULL,
    "governanceLockId" TEXT NOT NULL,
    "walletId" TEXT NOT NULL,
    "protocolId" TEXT NOT NULL,
    "lockEndsAt" TIMESTAMP(3),
    "lockAmount" DECIMAL(36,18) NOT NULL,
    "votingPower" DECIMAL(36,18) NOT NULL,
    "capturedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "metadata" JSONB,

    CONSTRAINT "GovernanceLockSnapshot_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "RewardOpportunitySnapshot" (
    "id" TEXT NOT NULL,
    "digestRunId" TEXT NOT NULL,
    "rewardOpportunityId" TEXT NOT NULL,
    "walletId" TEXT NOT NULL,
    "protocolId" TEXT NOT NULL,
    "tokenId" TEXT NOT NULL,
    "netUsd" DECIMAL(36,18),
    "usdValue" DECIMAL(36,18),
    "gasEstimateUsd" DECIMAL(36,18),
    "claimDeadline" TIMESTAMP(3),
    "capturedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "metadata" JSONB,

    CONSTRAINT "RewardOpportunitySnapshot_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "GammaswapPositionSnapshot" (
    "id" TEXT NOT NULL,
    "digestRunId" TEXT NOT NULL,
    "gammaswapPositionId" TEXT NOT NULL,
    "walletId" TEXT NOT NULL,
    "protocolId" TEXT NOT NULL,
    "poolId" TEXT NOT NULL,
    "healthRatio" DECIMAL(36,18),
    "notional" DECIMAL(36,18) NOT NULL,
    "debtValue" DECIMAL(36,18),
    "capturedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "metadata" JSONB,

    CONSTRAINT "GammaswapPositionSnapshot_pkey" PRIMARY KEY ("id")
);

-- CreateIndex
CREATE UNIQUE INDEX "wallet_address_chain_unique" ON "Wallet"("address", "chainId");

-- CreateIndex
CREATE UNIQUE INDEX "Protocol_slug_key" ON "Protocol"("slug");

-- CreateIndex
CREATE UNIQUE INDEX "token_chain_address_unique" ON "Token"("chainId", "address");

-- CreateIndex
CREATE UNIQUE INDEX "token_balance_wallet_token_unique" ON "TokenBalance"("walletId", "tokenId");

-- CreateIndex
CREATE INDEX "TokenBalance_tokenId_idx" ON "TokenBalance"("tokenId");

-- CreateIndex
CREATE INDEX "TokenBalance_walletId_idx" ON "TokenBalance"("walletId");

-- CreateIndex
CREATE INDEX "price_snapshot_token_recorded_idx" ON "PriceSnapshot"("tokenId", "recordedAt");

-- CreateIndex
CREATE UNIQUE INDEX "governance_lock_protocol_wallet_unique" ON "GovernanceLock"("protocolId", "walletId");

-- CreateIndex
CREATE INDEX "GovernanceLock_walletId_idx" ON "GovernanceLock"("walletId");

-- CreateIndex
CREATE INDEX "GovernanceLock_protocolId_idx" ON "GovernanceLock"("protocolId");

-- CreateIndex
CREATE INDEX "VoteEpoch_protocolId_startsAt_idx" ON "VoteEpoch"("protocolId", "startsAt");

-- CreateIndex
CREATE UNIQUE INDEX "vote_epoch_protocol_start_unique" ON "VoteEpoch"("protocolId", "startsAt");

-- CreateIndex
CREATE UNIQUE INDEX "gauge_protocol_address_unique" ON "Gauge"("protocolId", "address");

-- CreateIndex
CREATE INDEX "Gauge_chainId_idx" ON "Gauge"("chainId");

-- CreateIndex
CREATE UNIQUE INDEX "bribe_unique_reward" ON "Bribe"("gaugeId", "epochId", "rewardTokenId");

-- CreateIndex
CREATE INDEX "Bribe_epochId_idx" ON "Bribe"("epochId");

-- CreateIndex
CREATE INDEX "VotePowerSnapshot_governanceLockId_capturedAt_idx" ON "VotePowerSnapshot"("governanceLockId", "capturedAt");

-- CreateIndex
CREATE INDEX "VotePowerSnapshot_epochId_idx" ON "VotePowerSnapshot"("epochId");

-- CreateIndex
CREATE UNIQUE INDEX "reward_opportunity_unique" ON "RewardOpportunity"("protocolId", "walletId", "tokenId", "source");

-- CreateIndex
CREATE INDEX "RewardOpportunity_walletId_idx" ON "RewardOpportunity"("walletId");

-- CreateIndex
CREATE INDEX "RewardOpportunity_claimDeadline_idx" ON "RewardOpportunity"("claimDeadline");

-- CreateIndex
CREATE INDEX "RewardOpportunity_protocolId_computedAt_idx" ON "RewardOpportunity"("protocolId", "computedAt");

-- CreateIndex
CREATE INDEX "RewardClaim_walletId_claimedAt_idx" ON "RewardClaim"("walletId", "claimedAt");

-- CreateIndex
CREATE INDEX "RewardClaim_protocolId_claimedAt_idx" ON "RewardClaim"("protocolId", "claimedAt");

-- CreateIndex
CREATE UNIQUE INDEX "gammaswap_pool_unique" ON "GammaswapPool"("protocolId", "poolAddress");

-- CreateIndex
CREATE INDEX "GammaswapPosition_walletId_idx" ON "GammaswapPosition"("walletId");

-- CreateIndex
CREATE INDEX "GammaswapPosition_protocolId_lastSyncAt_idx" ON "GammaswapPosition"("protocolId", "lastSyncAt");

-- CreateIndex
CREATE INDEX "GammaswapPosition_healthRatio_idx" ON "GammaswapPosition"("healthRatio");

-- CreateIndex
CREATE UNIQUE INDEX "gammaswap_position_unique" ON "GammaswapPosition"("protocolId", "poolId", "walletId", "positionType");

-- CreateIndex
CREATE UNIQUE INDEX "Alert_contextHash_key" ON "Alert"("contextHash");

-- CreateIndex
CREATE INDEX "Alert_status_idx" ON "Alert"("status");

-- CreateIndex
CREATE INDEX "Alert_triggerAt_idx" ON "Alert"("triggerAt");

-- CreateIndex
CREATE INDEX "Alert_walletId_idx" ON "Alert"("walletId");

-- CreateIndex
CREATE INDEX "Alert_protocolId_idx" ON "Alert"("protocolId");

-- CreateIndex
CREATE INDEX "AlertDelivery_alertId_idx" ON "AlertDelivery"("alertId");

-- CreateIndex
CREATE INDEX "AlertDelivery_channel_idx" ON "AlertDelivery"("channel");

-- CreateIndex
CREATE UNIQUE INDEX "price_threshold_unique" ON "PriceThreshold"("walletId", "tokenId", "thresholdType", "thresholdPrice");

-- CreateIndex
CREATE INDEX "PriceThreshold_tokenId_idx" ON "PriceThreshold"("tokenId");

-- CreateIndex
CREATE INDEX "PriceThreshold_isEnabled_idx" ON "PriceThreshold"("isEnabled");

-- CreateIndex
CREATE UNIQUE INDEX "transaction_wallet_hash_token_unique" ON "Transaction"("walletId", "transactionHash", "tokenId");

-- CreateIndex
CREATE INDEX "Transaction_walletId_occurredAt_idx" ON "Transaction"("walletId", "occurredAt");

-- CreateIndex
CREATE INDEX "Transaction_tokenId_idx" ON "Transaction"("tokenId");

-- CreateIndex
CREATE INDEX "Transaction_transactionType_idx" ON "Transaction"("transactionType");

-- CreateIndex
CREATE INDEX "Transaction_blockNumber_idx" ON "Transaction"("blockNumber");

-- CreateIndex
CREATE INDEX "PortfolioSnapshot_walletId_capturedAt_idx" ON "PortfolioSnapshot"("walletId", "capturedAt");

-- CreateIndex
CREATE INDEX "PortfolioSnapshot_capturedAt_idx" ON "PortfolioSnapshot"("capturedAt");

-- CreateIndex
CREATE INDEX "PositionSnapshot_portfolioSnapshotId_idx" ON "PositionSnapshot"("portfolioSnapshotId");

-- CreateIndex
CREATE INDEX "PositionSnapshot_tokenId_idx" ON "PositionSnapshot"("tokenId");

-- CreateIndex
CREATE INDEX "PositionSnapshot_walletId_idx" ON "PositionSnapshot"("walletId");

-- CreateIndex
CREATE UNIQUE INDEX "performance_metric_wallet_timeframe_unique" ON "PerformanceMetric"("walletId", "timeframe");

-- CreateIndex
CREATE INDEX "PerformanceMetric_walletId_computedAt_idx" ON "PerformanceMetric"("walletId", "computedAt");

-- CreateIndex
CREATE INDEX "PerformanceMetric_timeframe_idx" ON "PerformanceMetric"("timeframe");

-- CreateIndex
CREATE UNIQUE INDEX "asset_correlation_unique" ON "AssetCorrelation"("token1Id", "token2Id", "timeframe");

-- CreateIndex
CREATE INDEX "AssetCorrelation_token1Id_computedAt_idx" ON "AssetCorrelation"("token1Id", "computedAt");

-- CreateIndex
CREATE INDEX "AssetCorrelation_token2Id_computedAt_idx" ON "AssetCorrelation"("token2Id", "computedAt");

-- CreateIndex
CREATE INDEX "AssetCorrelation_correlation_idx" ON "AssetCorrelation"("correlation");

-- CreateIndex
CREATE UNIQUE INDEX "protocol_exposure_wallet_protocol_unique" ON "ProtocolExposure"("walletId", "protocolId");

-- CreateIndex
CREATE INDEX "ProtocolExposure_walletId_computedAt_idx" ON "ProtocolExposure"("walletId", "computedAt");

-- CreateIndex
CREATE INDEX "ProtocolExposure_protocolId_computedAt_idx" ON "ProtocolExposure"("protocolId", "computedAt");

-- CreateIndex
CREATE INDEX "ProtocolExposure_overallRiskScore_idx" ON "ProtocolExposure"("overallRiskScore");

-- CreateIndex
CREATE INDEX "ProtocolExposure_concentrationRisk_idx" ON "ProtocolExposure"("concentrationRisk");

-- CreateIndex
CREATE UNIQUE INDEX "volatility_metric_unique" ON "VolatilityMetric"("tokenId", "walletId", "timeframe");

-- CreateIndex
CREATE INDEX "VolatilityMetric_tokenId_computedAt_idx" ON "VolatilityMetric"("tokenId", "computedAt");

-- CreateIndex
CREATE INDEX "VolatilityMetric_walletId_computedAt_idx" ON "VolatilityMetric"("walletId", "computedAt");

-- CreateIndex
CREATE INDEX "VolatilityMetric_volatility_idx" ON "VolatilityMetric"("volatility");

-- CreateIndex
CREATE INDEX "VolatilityMetric_beta_idx" ON "VolatilityMetric"("beta");

-- CreateIndex
CREATE UNIQUE INDEX "value_at_risk_unique" ON "ValueAtRisk"("walletId", "timeframe", "confidenceLevel");

-- CreateIndex
CREATE INDEX "ValueAtRisk_walletId_computedAt_idx" ON "ValueAtRisk"("walletId", "computedAt");

-- CreateIndex
CREATE INDEX "ValueAtRisk_varPercentage_idx" ON "ValueAtRisk"("varPercentage");

-- CreateIndex
CREATE INDEX "ValueAtRisk_confidenceLevel_idx" ON "ValueAtRisk"("confidenceLevel");

-- CreateIndex
CREATE UNIQUE INDEX "risk_adjusted_metric_unique" ON "RiskAdjustedMetric"("walletId", "timeframe");

-- CreateIndex
CREATE INDEX "RiskAdjustedMetric_walletId_computedAt_idx" ON "RiskAdjustedMetric"("walletId", "computedAt");

-- CreateIndex
CREATE INDEX "RiskAdjustedMetric_timeframe_idx" ON "RiskAdjustedMetric"("timeframe");

-- CreateIndex
CREATE INDEX "RiskAdjustedMetric_sharpeRatio_idx" ON "RiskAdjustedMetric"("sharpeRatio");

-- CreateIndex
CREATE INDEX "RiskAdjustedMetric_sortinoRatio_idx" ON "RiskAdjustedMetric"("sortinoRatio");

-- CreateIndex
CREATE INDEX "RiskEvent_walletId_createdAt_idx" ON "RiskEvent"("walletId", "createdAt");

-- CreateIndex
CREATE INDEX "RiskEvent_eventType_severity_idx" ON "RiskEvent"("eventType", "severity");

-- CreateIndex
CREATE INDEX "RiskEvent_isActive_idx" ON "RiskEvent"("isActive");

-- CreateIndex
CREATE UNIQUE INDEX "wallet_balance_snapshot_digest_wallet_unique" ON "WalletBalanceSnapshot"("digestRunId", "walletId");

-- CreateIndex
CREATE INDEX "WalletBalanceSnapshot_walletId_capturedAt_idx" ON "WalletBalanceSnapshot"("walletId", "capturedAt");

-- CreateIndex
CREATE UNIQUE INDEX "governance_lock_snapshot_digest_lock_unique" ON "GovernanceLockSnapshot"("digestRunId", "governanceLockId");

-- CreateIndex
CREATE INDEX "GovernanceLockSnapshot_lockEndsAt_idx" ON "GovernanceLockSnapshot"("lockEndsAt");

-- CreateIndex
CREATE INDEX "GovernanceLockSnapshot_walletId_idx" ON "GovernanceLockSnapshot"("walletId");

-- CreateIndex
CREATE INDEX "GovernanceLockSnapshot_protocolId_idx" ON "GovernanceLockSnapshot"("protocolId");

-- CreateIndex
CREATE UNIQUE INDEX "reward_snapshot_digest_opportunity_unique" ON "RewardOpportunitySnapshot"("digestRunId", "rewardOpportunityId");

-- CreateIndex
CREATE INDEX "RewardOpportunitySnapshot_claimDeadline_idx" ON "RewardOpportunitySnapshot"("claimDeadline");

-- CreateIndex
CREATE INDEX "RewardOpportunitySnapshot_walletId_idx" ON "RewardOpportunitySnapshot"("walletId");

-- CreateIndex
CREATE INDEX "RewardOpportunitySnapshot_protocolId_idx" ON "RewardOpportunitySnapshot"("protocolId");

-- CreateIndex
CREATE INDEX "RewardOpportunitySnapshot_tokenId_idx" ON "RewardOpportunitySnapshot"("tokenId");

-- CreateIndex
CREATE UNIQUE INDEX "gammaswap_snapshot_digest_position_unique" ON "GammaswapPositionSnapshot"("digestRunId", "gammaswapPositionId");

-- CreateIndex
CREATE INDEX "GammaswapPositionSnapshot_walletId_idx" ON "GammaswapPositionSnapshot"("walletId");

-- CreateIndex
CREATE INDEX "GammaswapPositionSnapshot_protocolId_idx" ON "GammaswapPositionSnapshot"("protocolId");

-- CreateIndex
CREATE INDEX "GammaswapPositionSnapshot_poolId_idx" ON "GammaswapPositionSnapshot"("poolId");

-- AddForeignKey
ALTER TABLE "Wallet" ADD CONSTRAINT "Wallet_chainId_fkey" FOREIGN KEY ("chainId") REFERENCES "Chain"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Protocol" ADD CONSTRAINT "Protocol_chainId_fkey" FOREIGN KEY ("chainId") REFERENCES "Chain"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Token" ADD CONSTRAINT "Token_chainId_fkey" FOREIGN KEY ("chainId") REFERENCES "Chain"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "TokenBalance" ADD CONSTRAINT "TokenBalance_walletId_fkey" FOREIGN KEY ("walletId") REFERENCES "Wallet"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "TokenBalance" ADD CONSTRAINT "TokenBalance_tokenId_fkey" FOREIGN KEY ("tokenId") REFERENCES "Token"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "PriceSnapshot" ADD CONSTRAINT "PriceSnapshot_tokenId_fkey" FOREIGN KEY ("tokenId") REFERENCES "Token"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "GovernanceLock" ADD CONSTRAINT "GovernanceLock_protocolId_fkey" FOREIGN KEY ("protocolId") REFERENCES "Protocol"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "GovernanceLock" ADD CONSTRAINT "GovernanceLock_walletId_fkey" FOREIGN KEY ("walletId") REFERENCES "Wallet"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "VoteEpoch" ADD CONSTRAINT "VoteEpoch_protocolId_fkey" FOREIGN KEY ("protocolId") REFERENCES "Protocol"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Gauge" ADD CONSTRAINT "Gauge_protocolId_fkey" FOREIGN KEY ("protocolId") REFERENCES "Protocol"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Gauge" ADD CONSTRAINT "Gauge_chainId_fkey" FOREIGN KEY ("chainId") REFERENCES "Chain"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Bribe" ADD CONSTRAINT "Bribe_gaugeId_fkey" FOREIGN KEY ("gaugeId") REFERENCES "Gauge"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Bribe" ADD CONSTRAINT "Bribe_epochId_fkey" FOREIGN KEY ("epochId") REFERENCES "VoteEpoch"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Bribe" ADD CONSTRAINT "Bribe_rewardTokenId_fkey" FOREIGN KEY ("rewardTokenId") REFERENCES "Token"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "VotePowerSnapshot" ADD CONSTRAINT "VotePowerSnapshot_governanceLockId_fkey" FOREIGN KEY ("governanceLockId") REFERENCES "GovernanceLock"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "VotePowerSnapshot" ADD CONSTRAINT "VotePowerSnapshot_epochId_fkey" FOREIGN KEY ("epochId") REFERENCES "VoteEpoch"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "RewardOpportunity" ADD CONSTRAINT "RewardOpportunity_protocolId_fkey" FOREIGN KEY ("protocolId") REFERENCES "Protocol"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "RewardOpportunity" ADD CONSTRAINT "RewardOpportunity_walletId_fkey" FOREIGN KEY ("walletId") REFERENCES "Wallet"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "RewardOpportunity" ADD CONSTRAINT "RewardOpportunity_governanceLockId_fkey" FOREIGN KEY ("governanceLockId") REFERENCES "GovernanceLock"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "RewardOpportunity" ADD CONSTRAINT "RewardOpportunity_tokenId_fkey" FOREIGN KEY ("tokenId") REFERENCES "Token"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "RewardClaim" ADD CONSTRAINT "RewardClaim_rewardOpportunityId_fkey" FOREIGN KEY ("rewardOpportunityId") REFERENCES "RewardOpportunity"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "RewardClaim" ADD CONSTRAINT "RewardClaim_protocolId_fkey" FOREIGN KEY ("protocolId") REFERENCES "Protocol"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "RewardClaim" ADD CONSTRAINT "RewardClaim_walletId_fkey" FOREIGN KEY ("walletId") REFERENCES "Wallet"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "RewardClaim" ADD CONSTRAINT "RewardClaim_tokenId_fkey" FOREIGN KEY ("tokenId") REFERENCES "Token"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "RewardClaim" ADD CONSTRAINT "RewardClaim_governanceLockId_fkey" FOREIGN KEY ("governanceLockId") REFERENCES "GovernanceLock"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "GammaswapPool" ADD CONSTRAINT "GammaswapPool_protocolId_fkey" FOREIGN KEY ("protocolId") REFERENCES "Protocol"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "GammaswapPool" ADD CONSTRAINT "GammaswapPool_baseTokenId_fkey" FOREIGN KEY ("baseTokenId") REFERENCES "Token"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "GammaswapPool" ADD CONSTRAINT "GammaswapPool_quoteTokenId_fkey" FOREIGN KEY ("quoteTokenId") REFERENCES "Token"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "GammaswapPosition" ADD CONSTRAINT "GammaswapPosition_protocolId_fkey" FOREIGN KEY ("protocolId") REFERENCES "Protocol"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "GammaswapPosition" ADD CONSTRAINT "GammaswapPosition_poolId_fkey" FOREIGN KEY ("poolId") REFERENCES "GammaswapPool"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "GammaswapPosition" ADD CONSTRAINT "GammaswapPosition_walletId_fkey" FOREIGN KEY ("walletId") REFERENCES "Wallet"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "GammaswapPosition" ADD CONSTRAINT "GammaswapPosition_assetTokenId_fkey" FOREIGN KEY ("assetTokenId") REFERENCES "Token"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Alert" ADD CONSTRAINT "Alert_walletId_fkey" FOREIGN KEY ("walletId") REFERENCES "Wallet"("id") ON DELETE SET NULL ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Alert" ADD CONSTRAINT "Alert_protocolId_fkey" FOREIGN KEY ("protocolId") REFERENCES "Protocol"("id") ON DELETE SET NULL ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Alert" ADD CONSTRAINT "Alert_tokenId_fkey" FOREIGN KEY ("tokenId") REFERENCES "Token"("id") ON DELETE SET NULL ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Alert" ADD CONSTRAINT "Alert_rewardOpportunityId_fkey" FOREIGN KEY ("rewardOpportunityId") REFERENCES "RewardOpportunity"("id") ON DELETE SET NULL ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Alert" ADD CONSTRAINT "Alert_gammaswapPositionId_fkey" FOREIGN KEY ("gammaswapPositionId") REFERENCES "GammaswapPosition"("id") ON DELETE SET NULL ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Alert" ADD CONSTRAINT "Alert_riskEventId_fkey" FOREIGN KEY ("riskEventId") REFERENCES "RiskEvent"("id") ON DELETE SET NULL ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "AlertDelivery" ADD CONSTRAINT "AlertDelivery_alertId_fkey" FOREIGN KEY ("alertId") REFERENCES "Alert"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "PriceThreshold" ADD CONSTRAINT "PriceThreshold_walletId_fkey" FOREIGN KEY ("walletId") REFERENCES "Wallet"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "PriceThreshold" ADD CONSTRAINT "PriceThreshold_tokenId_fkey" FOREIGN KEY ("tokenId") REFERENCES "Token"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Transaction" ADD CONSTRAINT "Transaction_walletId_fkey" FOREIGN KEY ("walletId") REFERENCES "Wallet"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Transaction" ADD CONSTRAINT "Transaction_tokenId_fkey" FOREIGN KEY ("tokenId") REFERENCES "Token"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Transaction" ADD CONSTRAINT "Transaction_protocolId_fkey" FOREIGN KEY ("protocolId") REFERENCES "Protocol"("id") ON DELETE SET NULL ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "PortfolioSnapshot" ADD CONSTRAINT "PortfolioSnapshot_walletId_fkey" FOREIGN KEY ("walletId") REFERENCES "Wallet"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "PositionSnapshot" ADD CONSTRAINT "PositionSnapshot_portfolioSnapshotId_fkey" FOREIGN KEY ("portfolioSnapshotId") REFERENCES "PortfolioSnapshot"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "PositionSnapshot" ADD CONSTRAINT "PositionSnapshot_tokenId_fkey" FOREIGN KEY ("tokenId") REFERENCES "Token"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "PositionSnapshot" ADD CONSTRAINT "PositionSnapshot_walletId_fkey" FOREIGN KEY ("walletId") REFERENCES "Wallet"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "PositionSnapshot" ADD CONSTRAINT "PositionSnapshot_protocolId_fkey" FOREIGN KEY ("protocolId") REFERENCES "Protocol"("id") ON DELETE SET NULL ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "PerformanceMetric" ADD CONSTRAINT "PerformanceMetric_walletId_fkey" FOREIGN KEY ("walletId") REFERENCES "Wallet"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "AssetCorrelation" ADD CONSTRAINT "AssetCorrelation_token1Id_fkey" FOREIGN KEY ("token1Id") REFERENCES "Token"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "AssetCorrelation" ADD CONSTRAINT "AssetCorrelation_token2Id_fkey" FOREIGN KEY ("token2Id") REFERENCES "Token"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "ProtocolExposure" ADD CONSTRAINT "ProtocolExposure_walletId_fkey" FOREIGN KEY ("walletId") REFERENCES "Wallet"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "ProtocolExposure" ADD CONSTRAINT "ProtocolExposure_protocolId_fkey" FOREIGN KEY ("protocolId") REFERENCES "Protocol"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "VolatilityMetric" ADD CONSTRAINT "VolatilityMetric_tokenId_fkey" FOREIGN KEY ("tokenId") REFERENCES "Token"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "VolatilityMetric" ADD CONSTRAINT "VolatilityMetric_walletId_fkey" FOREIGN KEY ("walletId") REFERENCES "Wallet"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "ValueAtRisk" ADD CONSTRAINT "ValueAtRisk_walletId_fkey" FOREIGN KEY ("walletId") REFERENCES "Wallet"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "RiskAdjustedMetric" ADD CONSTRAINT "RiskAdjustedMetric_walletId_fkey" FOREIGN KEY ("walletId") REFERENCES "Wallet"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "RiskEvent" ADD CONSTRAINT "RiskEvent_walletId_fkey" FOREIGN KEY ("walletId") REFERENCES "Wallet"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "WalletBalanceSnapshot" ADD CONSTRAINT "WalletBalanceSnapshot_digestRunId_fkey" FOREIGN KEY ("digestRunId") REFERENCES "DigestRun"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "WalletBalanceSnapshot" ADD CONSTRAINT "WalletBalanceSnapshot_walletId_fkey" FOREIGN KEY ("walletId") REFERENCES "Wallet"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "GovernanceLockSnapshot" ADD CONSTRAINT "GovernanceLockSnapshot_digestRunId_fkey" FOREIGN KEY ("digestRunId") REFERENCES "DigestRun"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "GovernanceLockSnapshot" ADD CONSTRAINT "GovernanceLockSnapshot_governanceLockId_fkey" FOREIGN KEY ("governanceLockId") REFERENCES "GovernanceLock"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "GovernanceLockSnapshot" ADD CONSTRAINT "GovernanceLockSnapshot_walletId_fkey" FOREIGN KEY ("walletId") REFERENCES "Wallet"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "GovernanceLockSnapshot" ADD CONSTRAINT "GovernanceLockSnapshot_protocolId_fkey" FOREIGN KEY ("protocolId") REFERENCES "Protocol"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "RewardOpportunitySnapshot" ADD CONSTRAINT "RewardOpportunitySnapshot_digestRunId_fkey" FOREIGN KEY ("digestRunId") REFERENCES "DigestRun"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "RewardOpportunitySnapshot" ADD CONSTRAINT "RewardOpportunitySnapshot_rewardOpportunityId_fkey" FOREIGN KEY ("rewardOpportunityId") REFERENCES "RewardOpportunity"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "RewardOpportunitySnapshot" ADD CONSTRAINT "RewardOpportunitySnapshot_walletId_fkey" FOREIGN KEY ("walletId") REFERENCES "Wallet"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "RewardOpportunitySnapshot" ADD CONSTRAINT "RewardOpportunitySnapshot_protocolId_fkey" FOREIGN KEY ("protocolId") REFERENCES "Protocol"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "RewardOpportunitySnapshot" ADD CONSTRAINT "RewardOpportunitySnapshot_tokenId_fkey" FOREIGN KEY ("tokenId") REFERENCES "Token"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "GammaswapPositionSnapshot" ADD CONSTRAINT "GammaswapPositionSnapshot_digestRunId_fkey" FOREIGN KEY ("digestRunId") REFERENCES "DigestRun"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "GammaswapPositionSnapshot" ADD CONSTRAINT "GammaswapPositionSnapshot_gammaswapPositionId_fkey" FOREIGN KEY ("gammaswapPositionId") REFERENCES "GammaswapPosition"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "GammaswapPositionSnapshot" ADD CONSTRAINT "GammaswapPositionSnapshot_walletId_fkey" FOREIGN KEY ("walletId") REFERENCES "Wallet"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "GammaswapPositionSnapshot" ADD CONSTRAINT "GammaswapPositionSnapshot_protocolId_fkey" FOREIGN KEY ("protocolId") REFERENCES "Protocol"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "GammaswapPositionSnapshot" ADD CONSTRAINT "GammaswapPositionSnapshot_poolId_fkey" FOREIGN KEY ("poolId") REFERENCES "GammaswapPool"("id") ON DELETE CASCADE ON UPDATE CASCADE;
