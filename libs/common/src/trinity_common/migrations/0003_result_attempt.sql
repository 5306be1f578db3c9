-- Which attempt produced a result, so a redelivery that finds the result stored
-- can report the original attempt instead of claiming one of its own.
ALTER TABLE job_results ADD COLUMN attempt integer NOT NULL DEFAULT 0;
