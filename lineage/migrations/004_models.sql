-- Rewriter training (issue 4): what a trained model learned from and how well, queryable without parsing params.
ALTER TABLE models ADD COLUMN IF NOT EXISTS heldout_loss_start DOUBLE;   -- held-out loss of the untrained model
ALTER TABLE models ADD COLUMN IF NOT EXISTS heldout_loss_end DOUBLE;     -- held-out loss after training
ALTER TABLE models ADD COLUMN IF NOT EXISTS n_pairs BIGINT;              -- training + held-out pairs used
ALTER TABLE models ADD COLUMN IF NOT EXISTS training_set VARCHAR;        -- the training-set parquet (pair ids inside)
ALTER TABLE models ADD COLUMN IF NOT EXISTS steps BIGINT;                -- optimizer steps taken
