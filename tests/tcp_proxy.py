"""A TCP proxy a test can cut: a database "blip" without touching the shared server.

The gateway connects to PostgreSQL through the proxy; `cut()` drops every open connection
and refuses new ones until `restore()`, as a restarting or unreachable database would.
"""
import socket
import threading

from tests.support import free_port


class TcpProxy:
    def __init__(self, target_host, target_port):
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._open = set()
        self._lock = threading.Lock()
        self._cut = False
        self._stopped = False

    def start(self):
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self):
        while not self._stopped:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self._cut:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source, sink):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                self._close(sock)

    def _close(self, sock):
        with self._lock:
            self._open.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def cut(self):
        """Drop every connection and refuse new ones."""
        self._cut = True
        with self._lock:
            live = list(self._open)
        for sock in live:
            self._close(sock)

    def restore(self):
        self._cut = False

    def stop(self):
        self._stopped = True
        self.cut()
        self._server.close()
