import asyncio

from services.common.server import serve
from services.common.settings import get_settings
from services.registry.app import build

asyncio.run(serve(build, "registry", get_settings()))
