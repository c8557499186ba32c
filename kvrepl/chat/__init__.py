"""The chat floor: the conversation, its session, turns, prompts and snapshots."""
