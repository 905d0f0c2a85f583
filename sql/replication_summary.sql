-- replication_summary: per configuration and transform, how often the source item of a transformed clip ranks first
-- (the goal: every transform ranks its source first in at least 95% of cases), the lower end of that share's 95%
-- interval (share_lower in views.sql: a few sources show little), and the mean and worst rank.
-- params: (none)
SELECT config_id, transform, count(*) AS sources, avg(CAST(rank = 1 AS DOUBLE)) AS share_first,
       share_lower(count_if(rank = 1), count(*)) AS share_first_low,
       avg(rank) AS mean_rank, max(rank) AS worst_rank
FROM replication
GROUP BY config_id, transform
ORDER BY config_id, transform;
