"""One module per pipeline step (build_queues, train_stage, evaluate, report); only the CLI imports them."""
