import logging

import uvicorn

from services.common.settings import get_settings
from services.gateway.app import UVICORN_WS, create_app

settings = get_settings()
logging.basicConfig(level=settings.log_level, format="%(asctime)s gateway %(levelname)s %(name)s: %(message)s")
uvicorn.run(
    create_app(settings),
    host=settings.http_host,
    port=settings.http_port,
    ws=UVICORN_WS,
    log_level=settings.log_level.lower(),
    timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
)
