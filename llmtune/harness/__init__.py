"""Stage 4: the PEFT training harness that runs inside each trial process: model, data, training, measurement."""
