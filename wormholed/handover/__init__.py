"""Handing a running daemon's listeners, live connections, UDP flows and control sockets to
its successor (an upgrade or a restart that drops no connection). See record.py for what
travels, transfer.py for how, takeover.py for the two daemons' conversation."""
