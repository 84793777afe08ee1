"""The LongSpec draft model for vLLM and its checkpoint format."""
