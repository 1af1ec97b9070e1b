"""Multi-head Latent Attention, rotary embeddings and the paged latent KV cache."""
