"""Before a run starts: what refuses it up front, and leaving the output as it was found when it does not start."""
from contextlib import contextmanager

from engine.config import EngineConfig
from engine.request import Request
from pipeline.plan import PREVIEW
from pipeline.storage import filesystem, is_local, join


def adapter_root_problem(config: EngineConfig, requests: list[Request]) -> str | None:
    """Why a run whose rows name adapters cannot start: the adapter root is not given, does not exist, or holds
    none of them (a typo in --adapters would otherwise turn every adapter row into an error row); None if fine."""
    named = sorted({r.adapter_id for r in requests if r.adapter_id is not None})
    if not named:
        return None
    adapters = f"{len(named):,} adapters ({', '.join(named[:PREVIEW])}{', …' * (len(named) > PREVIEW)})"
    if not config.adapters:
        return f"the rows name {adapters} but no adapter root was given: pass --adapters <root>"
    try:
        fs, root = filesystem(config.adapters, config.storage_options)
        folders = {e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(root, detail=True)
                   if e["type"] == "directory"} if fs.isdir(root) else None
    except Exception as e:  # noqa: BLE001 - bad URL, credentials, no such bucket: the run cannot start
        return f"cannot list the adapter root {config.adapters}: {type(e).__name__}: {e}"
    if folders is None:
        return f"the adapter root {config.adapters} does not exist, and the rows name {adapters}: check --adapters"
    if not folders & set(named):
        return f"the adapter root {config.adapters} holds none of the {adapters} the rows name: check --adapters"
    return None


@contextmanager
def output_as_found(output_url: str, storage_options: dict | None = None):
    """A run that fails before it writes anything (its model cannot be loaded, say) leaves the output as it
    found it: the folders that taking its lock made are removed again while they are empty. Object stores
    have no folders to leave behind."""
    fs, root = filesystem(output_url, storage_options)
    made = [p for p in (root, join(root, "_runs")) if is_local(fs) and not fs.exists(p)]
    try:
        yield
    except BaseException:
        for path in reversed(made):
            try:
                fs.rmdir(path)
            except OSError:   # not empty: the run wrote there (or another process did)
                pass
        raise
