-- The 7 days before the backup: 24-hour windows ending at the backup's snapshot time
-- (as_of, UTC), one row per window even when it holds no price at all. Not the plan's
-- DATE("recordedAt") >= NOW() - 7 days, which has 8 partial days and moves with the clock.
WITH days AS (
    SELECT k AS day_index,
           %(as_of)s::timestamp - make_interval(days => k) AS day_start,
           %(as_of)s::timestamp - make_interval(days => k - 1) AS day_end
    FROM generate_series(1, 7) AS k
), snaps AS (
    SELECT 1 + floor(extract(epoch FROM (%(as_of)s::timestamp - p."recordedAt")) / 86400)::int
               AS day_index,
           p."id",
           p."tokenId"
    FROM "PriceSnapshot" p
    WHERE p."recordedAt" >= %(as_of)s::timestamp - interval '7 days'
      AND p."recordedAt" < %(as_of)s::timestamp
)
SELECT d.day_index,
       d.day_start,
       d.day_end,
       count(s."id") AS snapshots,
       count(DISTINCT s."tokenId") AS tokens_tracked,
       'day -' || d.day_index || ': ' || count(DISTINCT s."tokenId") || ' tokens, '
           || count(s."id") || ' snapshots' AS day_summary
FROM days d
LEFT JOIN snaps s ON s.day_index = d.day_index
GROUP BY d.day_index, d.day_start, d.day_end
