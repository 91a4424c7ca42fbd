import logging
import os

import uvicorn

from services.common.server import PROCESS_UMASK
from services.common.settings import get_settings
from services.gateway.app import UVICORN_HTTP, UVICORN_WS, create_app

os.umask(PROCESS_UMASK)
settings = get_settings()
logging.basicConfig(level=settings.log_level, format="%(asctime)s gateway %(levelname)s %(name)s: %(message)s")
uvicorn.run(
    create_app(settings),
    host=settings.http_host,
    port=settings.http_port,
    ws=UVICORN_WS,
    http=UVICORN_HTTP,
    log_level=settings.log_level.lower(),
    timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
    # HTTPS when both are set (VERS_HTTP_TLS_CERT_FILE, VERS_HTTP_TLS_KEY_FILE)
    ssl_certfile=settings.http_tls_cert_file or None,
    ssl_keyfile=settings.http_tls_key_file or None,
)
