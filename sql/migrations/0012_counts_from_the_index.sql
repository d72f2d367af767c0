-- A scope's counts read from the index alone. Its rows (one per provider once folded,
-- plus the deltas appended since) lie on as many heap pages as folds and inserts put
-- them on: at a million connections, the fifty rows of every owner's counts were on
-- thirty-five pages, so the count read a page a row. With n in the index a count reads
-- a few index pages, and a heap page only where rows were added since the table was last
-- vacuumed (the sweep's fold vacuums it).
CREATE INDEX connection_counts_scope_provider_n
    ON {schema}.connection_counts (scope, provider) INCLUDE (n);

DROP INDEX {schema}.connection_counts_scope;
