-- Distortion (issue 3): the settings a pair was made under, so resume can tell "already made" in SQL.
-- variant = hash of (method, run seed, template version, and every setting that changes the text;
-- for method llm also the LLM's identity). pair_id = hash of (sample_id, variant).
ALTER TABLE pairs ADD COLUMN IF NOT EXISTS variant VARCHAR;
