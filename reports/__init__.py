"""Records -> DataFrame -> tables and figures. Reads records only; never recomputes a metric."""
