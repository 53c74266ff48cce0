"""The machine learning both tracks share, on both sides of the network: the model and its
LoRA adapter, batches, training (DP-SGD included), the frozen-layer cache, metrics and the
wire format of the exchanged weights."""
