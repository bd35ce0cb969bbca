"""The proving ground: a real Authlib DCR server, clients that behave like real ones, the reaper end to end."""
