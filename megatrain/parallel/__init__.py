"""Model parallelism: the TP x PP x DP layout, tensor-parallel layers, and where they are applied."""
