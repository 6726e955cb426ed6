"""Plugin discovery: entry points of group ``devicehost``, selection, isolation and validation.

A plugin is an entry point of group ``devicehost``. The object it names decides its kind:

- a **class** is a device type (built once per configured device, ``DeviceClass(config)``);
- any other object (a module, an instance) that holds hook implementations is a
  **cross-cutting** plugin, registered beside every device (tracing, metrics, fault injection).

Every plugin declares the host API it was written against with a second entry point, of group
``devicehost.api`` and the same name, whose value names the constant
(``vmbfs = "devicehost:HOST_API_V1"``). The declaration is parsed from the metadata string and never
imported, so a plugin written for another host API is refused before any of its code runs.

Two operations, with different costs:

- :func:`list_plugins` reads metadata only. It imports no plugin code at all, which keeps
  ``devicehost list`` fast. Its verdict is what metadata can prove: a plugin is ``blocked`` (not
  selected), ``error`` (no or another host API, two distributions claiming its name) or
  ``available`` (selected, and its metadata is sound). Whether its code imports and its hooks
  match the specs is only known after :func:`load_plugins` (``devicehost doctor``,
  ``devicehost list --load``), whose verdicts are ``loaded`` or ``error``.
- :func:`load_plugins` imports each selected plugin on its own. An import error, hook
  implementations that do not match the specs, or a host-API mismatch is recorded against that
  plugin (:class:`PluginInfo` with status ``error``), and every other plugin keeps working. With
  ``strict=True`` any plugin error raises :class:`~devicehost.errors.PluginError` instead, after
  all plugins were examined, naming all of them.

Selection (decided before import, names match the entry-point name or the distribution name;
distribution names compare normalised, ``devicehost_foo`` == ``DeviceHost-Foo``):

1. ``-p no:NAME`` blocks NAME. It wins over everything else.
2. ``-p NAME`` selects NAME even when autoload is off or an allow-list is set.
3. ``DEVICEHOST_LOAD_PLUGINS=a,b``, when set, is an allow-list: only the named plugins load.
   Set but empty means no plugin loads (as ``LLM_LOAD_PLUGINS`` does).
4. ``DEVICEHOST_DISABLE_PLUGIN_AUTOLOAD=1`` (any value but empty, ``0``, ``false``, ``no``,
   ``off``), as in pytest: no plugin is loaded unless it is named by ``-p NAME`` or by the
   allow-list.
5. Otherwise every installed plugin is selected.

A name given to ``-p NAME``, ``-p no:NAME`` or the allow-list that no installed plugin has (a
typo) is reported by :meth:`Selection.unknown` and in :attr:`Registry.missing`, with the closest
installed name; ``devicehost`` warns about it, ``doctor`` and strict mode fail on it.

Two distributions that declare the same device (entry-point) name: both get status ``error``
naming both distributions, and neither is loaded; blocking one of them by distribution name
(``-p no:DIST``) resolves the conflict.

This module is imported by ``devicehost list``; keep its imports tiny (no anyio, no attrs).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple

from devicehost import HOST_API_VERSION, __version__
from devicehost.errors import ConfigError, PluginError, ends_the_host

if TYPE_CHECKING:
    import logging

    from importlib_metadata import EntryPoint

__all__ = [
    "API_GROUP",
    "GROUP",
    "PluginInfo",
    "PluginStatus",
    "Registry",
    "Selection",
    "list_plugins",
    "list_selection",
    "load_plugins",
]

#: Entry-point group naming plugin objects.
GROUP: Final = "devicehost"
#: Entry-point group declaring, under the same name, the host API a plugin was written against.
API_GROUP: Final = "devicehost.api"

#: The host API versions this host can serve.
SUPPORTED_API_VERSIONS: Final = frozenset({HOST_API_VERSION})

_API_VALUE: Final = re.compile(r"\s*devicehost\s*:\s*HOST_API_V(\d+)\s*")
_FALSE_WORDS: Final = frozenset({"", "0", "false", "no", "off"})

PluginStatus = Literal["available", "loaded", "blocked", "error"]


def _log() -> logging.Logger:
    import logging  # not at module level: ``devicehost list`` never logs

    return logging.getLogger("devicehost.plugins")


class PluginInfo(NamedTuple):
    """What the host knows about one installed plugin.

    ``name`` is the entry-point name (the device name for a device type); ``distribution`` and
    ``version`` come from the installed distribution's metadata. ``error`` says why the plugin is
    not loaded: the failure for status ``error``, the reason for status ``blocked``; it is ``None``
    for a plugin that is ``available`` (metadata sound, not imported) or ``loaded`` (imported and
    validated). ``kind`` is ``"device"`` or ``"cross-cutting"`` once the plugin was
    imported, else ``None``. ``value`` is the entry point's ``module:attr``.
    """

    name: str
    distribution: str
    version: str
    status: PluginStatus
    error: str | None = None
    kind: str | None = None
    value: str = ""

    def to_json(self) -> dict[str, str | None]:
        """The JSON object ``devicehost list --json`` prints for this plugin."""
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "status": self.status,
            "error": self.error,
        }


def _normalise_dist(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class Selection(NamedTuple):
    """Which plugins to load, from ``-p`` arguments and the environment."""

    blocked: frozenset[str] = frozenset()
    requested: frozenset[str] = frozenset()
    allow: frozenset[str] | None = None
    autoload: bool = True

    @classmethod
    def from_args(
        cls, plugin_args: Sequence[str] = (), environ: Mapping[str, str] | None = None
    ) -> Selection:
        """Build a selection from ``-p`` values (``NAME`` or ``no:NAME``) and the environment."""
        env = os.environ if environ is None else environ
        blocked: set[str] = set()
        requested: set[str] = set()
        for arg in plugin_args:
            arg = arg.strip()
            if arg.startswith("no:"):
                blocked.add(arg[3:].strip())
            elif arg:
                requested.add(arg)
        allow: frozenset[str] | None = None
        allow_text = env.get("DEVICEHOST_LOAD_PLUGINS")
        if allow_text is not None:
            allow = frozenset(n.strip() for n in allow_text.split(",") if n.strip())
        autoload_off = env.get("DEVICEHOST_DISABLE_PLUGIN_AUTOLOAD", "").strip().lower()
        return cls(
            blocked=frozenset(blocked),
            requested=frozenset(requested),
            allow=allow,
            autoload=autoload_off in _FALSE_WORDS,
        )

    @staticmethod
    def _match(names: frozenset[str], ep_name: str, dist: str) -> str | None:
        norm = _normalise_dist(dist)
        return next((n for n in names if n == ep_name or _normalise_dist(n) == norm), None)

    @classmethod
    def _matches(cls, names: frozenset[str], ep_name: str, dist: str) -> bool:
        return cls._match(names, ep_name, dist) is not None

    def blocked_reason(self, ep_name: str, dist: str) -> str | None:
        """``None`` if the plugin is selected, else why it is not."""
        blocker = self._match(self.blocked, ep_name, dist)
        if blocker is not None:
            return f"blocked by -p no:{blocker}"
        if self._matches(self.requested, ep_name, dist):
            return None
        if self.allow is not None:
            if self._matches(self.allow, ep_name, dist):
                return None
            return "not in DEVICEHOST_LOAD_PLUGINS"
        if not self.autoload:
            return (
                "autoload disabled by DEVICEHOST_DISABLE_PLUGIN_AUTOLOAD"
                " (select it with -p NAME or DEVICEHOST_LOAD_PLUGINS)"
            )
        return None

    def missing(self, infos: Iterable[PluginInfo]) -> list[str]:
        """Requested or allow-listed names that no installed plugin has."""
        infos = list(infos)
        return sorted(problem.split(":", 1)[0] for problem in self.unknown(infos)
                      if not problem.startswith("no:"))

    def unknown(self, infos: Iterable[PluginInfo]) -> list[str]:
        """One line per name in the selection that no installed plugin has: ``NAME: why``,
        ``no:NAME: why`` for a block (with the closest installed name, if any)."""
        import difflib

        infos = list(infos)
        known = sorted({i.name for i in infos} | {i.distribution for i in infos})

        def absent(name: str) -> bool:
            return not any(self._matches(frozenset({name}), i.name, i.distribution) for i in infos)

        def hint(name: str) -> str:
            close = difflib.get_close_matches(name, known, n=1)
            return f" (did you mean {close[0]!r}?)" if close else ""

        lines = [f"{n}: requested with -p, but no installed plugin has this name{hint(n)}"
                 for n in sorted(self.requested) if absent(n)]
        lines += [f"{n}: named in DEVICEHOST_LOAD_PLUGINS, but no installed plugin has this"
                  f" name{hint(n)}" for n in sorted(self.allow or ()) if absent(n)
                  and n not in self.requested]
        lines += [f"no:{n}: blocks nothing, no installed plugin has this name{hint(n)}"
                  for n in sorted(self.blocked) if absent(n)]
        return lines


class _Candidate:
    __slots__ = ("ep", "info")

    def __init__(self, ep: EntryPoint, info: PluginInfo) -> None:
        self.ep = ep
        self.info = info


class _Identities:
    """Distribution name and version of each entry point's distribution, read once.

    The ``Name:`` and ``Version:`` headers are read straight from the metadata file: parsing it
    with :mod:`email` (what ``Distribution.name`` does) costs more than the rest of a listing.
    """

    def __init__(self) -> None:
        self._seen: dict[int, tuple[str, str]] = {}

    def of(self, ep: EntryPoint) -> tuple[str, str]:
        dist = ep.dist
        if dist is None:
            return "<unknown>", "<unknown>"
        known = self._seen.get(id(dist))
        if known is None:
            known = self._seen[id(dist)] = self._read(dist)
        return known

    @staticmethod
    def _read(dist: Any) -> tuple[str, str]:
        text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
        headers: dict[str, str] = {}
        for line in text.splitlines():
            if not line.strip():
                break
            key, sep, value = line.partition(":")
            if sep and key in ("Name", "Version") and key not in headers:
                headers[key] = value.strip()
        if "Name" in headers and "Version" in headers:
            return headers["Name"], headers["Version"]
        return str(dist.name), str(dist.version)


def _read_metadata() -> tuple[list[tuple[EntryPoint, str, str]], dict[tuple[str, str], str]]:
    """Plugin entry points with their distribution's name and version, and the host-API
    declarations keyed by (normalised distribution name, entry-point name)."""
    import importlib_metadata

    identities = _Identities()
    everything = importlib_metadata.entry_points()
    plugins = [(ep, *identities.of(ep)) for ep in everything.select(group=GROUP)]
    declarations: dict[tuple[str, str], str] = {}
    for ep in everything.select(group=API_GROUP):
        dist, _ = identities.of(ep)
        declarations[(_normalise_dist(dist), ep.name)] = ep.value
    return plugins, declarations


def _api_error(name: str, declaration: str | None) -> str | None:
    hint = f"add an entry point of group {API_GROUP!r}: {name} = \"devicehost:HOST_API_V1\""
    if declaration is None:
        return f"declares no host API ({hint})"
    match = _API_VALUE.fullmatch(declaration)
    if match is None:
        return f"declares host API {declaration!r}, which is not a host API constant ({hint})"
    version = int(match.group(1))
    if version not in SUPPORTED_API_VERSIONS:
        return (
            f"needs host API {version}, but devicehost {__version__} provides host API"
            f" {', '.join(str(v) for v in sorted(SUPPORTED_API_VERSIONS))}"
        )
    return None


def _examine(selection: Selection) -> tuple[list[_Candidate], list[str], list[str]]:
    """Metadata-only verdicts for every installed plugin, in a stable order."""
    plugins, declarations = _read_metadata()
    candidates: list[_Candidate] = []
    for ep, dist, version in plugins:
        reason = selection.blocked_reason(ep.name, dist)
        status: PluginStatus = "available" if reason is None else "blocked"
        info = PluginInfo(ep.name, dist, version, status, reason, value=ep.value)
        candidates.append(_Candidate(ep, info))
    candidates.sort(key=lambda c: (c.info.name, _normalise_dist(c.info.distribution)))

    claims: dict[str, list[_Candidate]] = {}
    for cand in candidates:
        if cand.info.status == "available":
            claims.setdefault(cand.info.name, []).append(cand)
    for name, claimants in claims.items():
        if len(claimants) > 1:
            dists = " and ".join(
                f"{c.info.distribution!r} ({c.info.version})" for c in claimants
            )
            message = (
                f"device name {name!r} is claimed by distributions {dists}; uninstall one,"
                " or block one with -p no:DISTRIBUTION"
            )
            for cand in claimants:
                cand.info = cand.info._replace(status="error", error=message)

    for cand in candidates:
        if cand.info.status != "available":
            continue
        key = (_normalise_dist(cand.info.distribution), cand.info.name)
        problem = _api_error(cand.info.name, declarations.get(key))
        if problem is not None:
            cand.info = cand.info._replace(status="error", error=problem)
    infos = [c.info for c in candidates]
    return candidates, selection.missing(infos), selection.unknown(infos)


def list_plugins(
    plugin_args: Sequence[str] = (), environ: Mapping[str, str] | None = None
) -> list[PluginInfo]:
    """Every installed plugin with its metadata-only verdict; imports no plugin code."""
    candidates, _, _ = _examine(Selection.from_args(plugin_args, environ))
    return [c.info for c in candidates]


def list_selection(
    plugin_args: Sequence[str] = (), environ: Mapping[str, str] | None = None
) -> tuple[list[PluginInfo], list[str]]:
    """:func:`list_plugins` and the selection names that match no installed plugin (see
    :meth:`Selection.unknown`); reads metadata only."""
    candidates, _, unknown = _examine(Selection.from_args(plugin_args, environ))
    return [c.info for c in candidates], unknown


class Registry:
    """The loaded plugins: device types by name, cross-cutting plugins, and every verdict."""

    def __init__(
        self,
        device_classes: dict[str, type],
        cross_cutting: list[object],
        infos: list[PluginInfo],
        missing: list[str] | None = None,
        unknown: list[str] | None = None,
    ) -> None:
        self.device_classes = device_classes
        self.cross_cutting = cross_cutting
        self.infos = infos
        self.missing = list(missing or [])
        #: Every selection name that matches no installed plugin (``Selection.unknown``).
        self.unknown = list(unknown or [])

    def __repr__(self) -> str:
        return (
            f"<Registry devices={sorted(self.device_classes)} cross_cutting="
            f"{len(self.cross_cutting)} errors={[i.name for i in self.errors]}>"
        )

    @property
    def errors(self) -> list[PluginInfo]:
        """The plugins whose status is ``error``."""
        return [i for i in self.infos if i.status == "error"]

    def info(self, name: str) -> PluginInfo | None:
        """The verdict of the plugin with this entry-point name (the first, if two claim it)."""
        return next((i for i in self.infos if i.name == name), None)

    def problems(self) -> list[str]:
        """One line per broken plugin and per selection name that matches no installed plugin
        (requested, allow-listed or blocked)."""
        lines = [f"{i.name} ({i.distribution} {i.version}): {i.error}" for i in self.errors]
        lines += self.unknown or [
            f"{n}: requested, but no installed plugin has this name" for n in self.missing]
        return lines

    def _record(self, name: str, error: str) -> None:
        self.infos = [
            i._replace(status="error", error=error) if i.name == name else i
            for i in self.infos
        ]

    def create_device(self, plugin_name: str, config: Any) -> object:
        """Construct one device of a loaded device plugin: ``DeviceClass(config)``.

        A constructor exception (``SystemExit`` too) is recorded against the plugin (status
        ``error``) and raised as :class:`PluginError`. The class stays registered: another
        config may construct fine. A :class:`~devicehost.errors.ConfigError` (a configured value
        the device refuses) is the config's fault, not the plugin's: it is raised as it is, and
        nothing is recorded.
        """
        cls = self.device_classes.get(plugin_name)
        if cls is None:
            info = self.info(plugin_name)
            why = f" ({info.status}: {info.error})" if info is not None and info.error else ""
            raise PluginError(f"device plugin {plugin_name!r} is not loaded{why}")
        try:
            return cls(config)
        except ConfigError:
            raise
        except BaseException as exc:
            # A constructor calling sys.exit() fails its device, not the host (see ends_the_host).
            if ends_the_host(exc):
                raise
            error = f"constructor raised {type(exc).__name__}: {exc}"
            _log().error("plugin %r: %s", plugin_name, error, exc_info=exc)
            self._record(plugin_name, error)
            raise PluginError(f"plugin {plugin_name!r}: {error}") from exc


def _validate(obj: object) -> str:
    """Check ``obj``'s hook implementations against the specs; return its kind.

    A class is registered as such in a scratch plugin manager (pluggy strips ``self``); pluggy
    then rejects unknown hooks, arguments the spec lacks and misused options.
    """
    import inspect

    import pluggy

    from devicehost import hookspecs

    pm = pluggy.PluginManager("devicehost")
    pm.add_hookspecs(hookspecs)
    pm.register(obj, name="candidate")
    pm.check_pending()
    callers = {c.name for c in pm.get_hookcallers(obj) or []}
    if inspect.isclass(obj):
        if "offer" not in callers:
            raise PluginError(f"device class {obj.__qualname__} implements no 'offer' hook")
        _validate_config_class(obj)
        return "device"
    if not callers:
        raise PluginError(
            f"{obj!r} is neither a device class nor an object with hook implementations"
        )
    return "cross-cutting"


def _validate_config_class(cls: type) -> None:
    config_class = getattr(cls, "config_class", None)
    if config_class is None:
        return
    import attrs

    if not (isinstance(config_class, type) and attrs.has(config_class)):
        raise PluginError(f"{cls.__qualname__}.config_class is not an attrs class")
    for field in attrs.fields(config_class):
        if field.default is attrs.NOTHING:
            raise PluginError(
                f"{cls.__qualname__}.config_class field {field.name!r} has no default"
            )


def _load(cand: _Candidate) -> tuple[object | None, PluginInfo]:
    import pluggy

    try:
        obj = cand.ep.load()
    except (Exception, SystemExit) as exc:
        _log().debug("plugin %r failed to import", cand.info.name, exc_info=exc)
        return None, cand.info._replace(
            status="error", error=f"import failed: {type(exc).__name__}: {exc}"
        )
    try:
        kind = _validate(obj)
    except pluggy.PluginValidationError as exc:
        error = f"hook implementations do not match the specs: {exc}"
    except PluginError as exc:
        error = str(exc)
    except Exception as exc:
        error = f"validation failed: {type(exc).__name__}: {exc}"
    else:
        return obj, cand.info._replace(status="loaded", kind=kind)
    return None, cand.info._replace(status="error", error=" ".join(error.split()))


def load_plugins(
    plugin_args: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    *,
    strict: bool = False,
) -> Registry:
    """Import and validate each selected plugin in isolation; see the module docstring."""
    candidates, missing, unknown = _examine(Selection.from_args(plugin_args, environ))
    device_classes: dict[str, type] = {}
    cross_cutting: list[object] = []
    infos: list[PluginInfo] = []
    for cand in candidates:
        info = cand.info
        if info.status == "available":
            obj, info = _load(cand)
            if isinstance(obj, type):
                device_classes[info.name] = obj
            elif obj is not None:
                cross_cutting.append(obj)
        if info.status == "error":
            _log().debug("plugin %r (%s) is broken: %s", info.name, info.distribution, info.error)
        infos.append(info)
    registry = Registry(device_classes, cross_cutting, infos, missing, unknown)
    if strict and (registry.errors or registry.unknown):
        raise PluginError("plugin errors (strict mode):\n  " + "\n  ".join(registry.problems()))
    return registry
