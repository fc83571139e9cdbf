"""Stage 3: one trial: its process (fresh or forked from the fork server), its result, how it can end."""
