import asyncio

from services.common.server import serve
from services.common.settings import get_settings
from services.tagging.app import build

asyncio.run(serve(build, "tagging", get_settings()))
