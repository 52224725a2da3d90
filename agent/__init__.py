"""lmt.agent: the daemon. Owns asyncio, SQLite and MQTT, and wires the other packages."""
