"""The method: schedule (stages), objectives, InfoNCE losses, queue kinds and the key-queue store."""
