-- Why a run failed, and which process ran it. error: "<ErrorClass>: <message>" of the exception that ended a
-- failed run. host, pid: the flow's process, so that a run whose process died without recording an outcome
-- (kill -9, a lost machine) is told from one still going: the next run on that host marks it 'interrupted', and
-- `polite runs` shows it so at once. Rows written before this migration have all three NULL.
ALTER TABLE runs ADD COLUMN IF NOT EXISTS error VARCHAR;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS host VARCHAR;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS pid INTEGER;
