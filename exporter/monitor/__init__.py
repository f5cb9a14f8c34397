"""Watched sockets: opening them and their monitors, the fd budget, and the reader and engine that
turn monitor events into state."""
