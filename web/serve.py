"""Static server for the Seal page: index.html, web/ (with the demo model) and dist/ on 127.0.0.1, nothing else.

usage: python3 web/serve.py [--port N]   (0 picks a free port; the chosen URL is printed)
"""

import argparse
import http.server
import pathlib
import posixpath
import urllib.parse

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSP = ("default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; connect-src 'self'; "
       "img-src 'self' data: blob:; style-src 'self'; worker-src 'self' blob:; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".wasm": "application/wasm", ".png": "image/png",
         ".svg": "image/svg+xml", ".json": "application/json", ".txt": "text/plain; charset=utf-8",
         ".safetensors": "application/octet-stream"}


class Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=str(ROOT), **kwargs)

    def send_head(self):
        path = posixpath.normpath(urllib.parse.unquote(self.path.split("?", 1)[0].split("#", 1)[0]))
        if path == "/":
            self.path = "/index.html"
        elif not (path.startswith(("/web/", "/dist/")) and pathlib.PurePosixPath(path).suffix in TYPES):
            self.send_error(404)
            return None
        return super().send_head()

    def guess_type(self, path):
        return TYPES.get(pathlib.PurePosixPath(path).suffix, "application/octet-stream")

    def end_headers(self):
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    port = parser.parse_args().port
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler) as server:
        print(f"serving Seal on http://127.0.0.1:{server.server_address[1]}/", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
