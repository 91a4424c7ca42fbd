import asyncio

from services.common.server import serve
from services.common.settings import get_settings
from services.orchestrator.app import build

asyncio.run(serve(build, "orchestrator", get_settings()))
