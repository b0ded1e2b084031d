-- One row per alert. last_24h_count labels each alert triggered in the 24 hours before the
-- backup (as_of, UTC) with its status/severity group's size, e.g. 'pending/critical = 3',
-- so that the set of labels is the per-group count the plan's GROUP BY status, severity gives.
SELECT alert_id,
       status,
       severity,
       trigger_at,
       CASE WHEN last_24h
            THEN status || '/' || severity || ' = '
                 || count(*) OVER (PARTITION BY status, severity, last_24h)
       END AS last_24h_count
FROM (
    SELECT a."id" AS alert_id,
           a."status" AS status,
           a."severity" AS severity,
           a."triggerAt" AS trigger_at,
           a."triggerAt" >= %(as_of)s::timestamp - interval '24 hours' AS last_24h
    FROM "Alert" a
) s
