-- V10: room in jobs_active's primary key for the version each claim adds.
--
-- A claim changes a job's status, so its new row version cannot be a HOT update: it gets a second
-- entry in the primary key, beside the first, under the same id. A backlog inserted in one go leaves
-- the key's leaf pages 90% full (the default fillfactor for pages split at the right edge), so the
-- claims of the jobs on one page soon split it: one split for every few dozen claims. Leaf pages
-- filled to half have room for every job's second entry until vacuum or bottom-up deletion removes
-- the first. 200,000-job drains, three pairs: the claim 16.3-16.5 us a job against 17.6-18.5 at 90%
-- (docs/performance.md), for a key twice as large while a backlog waits (about 30 MB a million jobs).
--
-- Metadata only: pages split from now on are filled to half; pages already there keep their fill
-- until they are split or the index is rebuilt (REINDEX), which nothing here requires.

ALTER INDEX jobs_active_pkey SET (fillfactor = 50);
