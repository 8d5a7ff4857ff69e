"""The sans-I/O IMAP protocol layer: no sockets, no clocks, no gevent."""
