"""The loops: one training epoch (`train_one_epoch`) and batched anomaly scoring (`run_inference`,
`evaluate`). They take named values, never the command line's `args`."""
