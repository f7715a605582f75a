"""What the model stages (pretrain, finetune, evaluate, export) share: launching training
in a torchrun child and publishing its model, catalog subsets as token files, the loss curve."""
