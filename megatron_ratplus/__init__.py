"""megatron-ratplus: RAT+ recurrence-augmented attention on megatron-core (train dense, infer sparse)."""
