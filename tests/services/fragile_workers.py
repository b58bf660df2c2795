"""Worker subclasses for fault tests, named by `PoolConfig.worker_cls` (Ray workers import this module from
tests/services, which the ray_serve fixture puts on their PYTHONPATH)."""

from services.decode import DecodeWorker


class BreakableDecodeWorker(DecodeWorker):
    """A decode worker whose engine step can be made to fail, as a device fault or a kernel bug would."""

    async def break_engine(self) -> str:
        """From the next step on, the engine raises; returns this replica's name."""

        def broken_step():
            raise RuntimeError("injected engine fault")

        self.engine.step = broken_step
        return self.name
