"""The one msgpack codec of the pcisplit protocol.

Wire form of a message: a msgpack array ``[TAG, field1, field2, ...]`` with the
fields in dataclass declaration order. Nested values are arrays too:
:class:`Limits` is ``[max_message_size, max_in_flight]``, :class:`DeviceInfo`
is its eight integers, ``config`` (bin or nil) and ``bar_sizes``, an :class:`ErrorCode` is
its integer, tuples are arrays, ``bytes`` are msgpack *bin*, ``str`` is UTF-8.
No maps and no ext types are ever used.

Decoding treats every byte as hostile. Whatever the input, :func:`decode`
either returns a valid message or raises :class:`MalformedMessageError` (a
:class:`RemoteProtocolError`); nothing else escapes. Hard limits are applied
*while* unpacking (msgpack's ``max_*_len``), so a length header claiming 4 GiB
allocates nothing, and field types are checked before any message is built,
so a hostile value is never ``repr``-ed or compared in surprising ways.

Per-class field layouts are computed once (on first use of each class), so the
hot path does no reflection.

The fast path
-------------
Messages whose fields are all declared integers (``IntField`` annotations in
``_messages``: config and BAR reads and writes, resets, pings, value and done
replies) also get a decoder and an encoder generated from those declarations:
one ``msgpack`` call, then one inline type-and-range test per field, and the
slotted message is filled in without running its constructor again. The fast
decoder only ever *accepts*: anything it does not accept goes through the
general path below, which raises the error. So the same bytes give the same
message or the same error on both paths (a hypothesis test checks it).
"""

from __future__ import annotations

import dataclasses
import operator
import typing
from collections.abc import Callable
from typing import Any, NoReturn

import msgpack

from shared.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from shared.protocol._messages import (
    MAX_DMA_CHUNK,
    MESSAGE_TYPES,
    U32,
    DeviceInfo,
    Limits,
    Message,
    declared_fields,
)
from shared.protocol._schema import MAX_DEVICES, MAX_FEATURES, MAX_TEXT_LEN

__all__ = [
    "encode",
    "decode",
    "MalformedMessageError",
    "UnknownMessageError",
    "REQUEST_TAGS",
    "REPLY_TAGS",
    "EVENT_TAGS",
    "CONTROL_TAGS",
    "CALL_RESULT_TAGS",
]

#: Tag ranges (see ``_messages``). A frame whose tag is in ``REQUEST_TAGS`` and
#: whose second element is a valid u32 has a readable request id, so a bad
#: request can be answered with an ErrorReply instead of a disconnect.
CONTROL_TAGS = range(0x01, 0x10)
REQUEST_TAGS = range(0x10, 0x40)
REPLY_TAGS = range(0x40, 0x60)
EVENT_TAGS = range(0x60, 0x80)
#: Frontend -> backend answers to backend calls (DmaCallResult). Deliberately
#: outside ``REQUEST_TAGS``: their second element is a call id, not a request
#: id, and a malformed one must never be "answered" with an ErrorReply.
CALL_RESULT_TAGS = range(0x80, 0xA0)


class MalformedMessageError(RemoteProtocolError):
    """A frame that does not decode to a valid message.

    ``tag`` is the wire tag when it could be read. ``request_id`` is set only
    when the frame is in the request range and its id could be read: such a
    request is *answerable* (see :meth:`Connection.error_reply_for`).
    ``code`` is the :class:`ErrorCode` to answer with (``PROTOCOL_ERROR``
    unless the failed check names something more precise, such as
    ``INVALID_SIZE``).
    """

    def __init__(
        self,
        message: str,
        *,
        tag: int | None = None,
        request_id: int | None = None,
        code: ErrorCode | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.tag = tag
        self.request_id = request_id


class UnknownMessageError(MalformedMessageError):
    """A well-formed frame whose tag names no message we know.

    In the request range this is an unknown *operation*; the backend answers
    ``NOT_IMPLEMENTED`` and keeps the connection.
    """

    code = ErrorCode.NOT_IMPLEMENTED


# --------------------------------------------------------------------------- limits

# Longest legal string in UTF-8 bytes (a character is at most 4 bytes), the
# largest bin (one DMA chunk; the next largest is a 4 KiB extended config
# image) and the longest legal array. Anything longer is rejected by msgpack
# before it allocates; in any case ``decode`` refuses a frame over the
# receiver's ``max_message_size`` before unpacking, so a bin can never claim
# more than the frame holds.
_MAX_STR_BYTES = 4 * MAX_TEXT_LEN
_MAX_BIN_BYTES = max(4096, MAX_DMA_CHUNK)
_MAX_ARRAY_LEN = max(MAX_DEVICES, MAX_FEATURES, 16)


def _reject_ext(code: int, data: bytes) -> NoReturn:
    raise ValueError(f"msgpack ext type {code} is not used by this protocol")


_UNPACK_OPTIONS: dict[str, Any] = {
    "raw": False,  # str is UTF-8 text; invalid UTF-8 is an error, not bytes
    "use_list": False,  # arrays become tuples: immutable, and what the dataclasses want
    "strict_map_key": True,
    "max_str_len": _MAX_STR_BYTES,
    "max_bin_len": _MAX_BIN_BYTES,
    "max_array_len": _MAX_ARRAY_LEN,
    "max_map_len": 0,  # the protocol has no maps at all
    "max_ext_len": 0,
    "ext_hook": _reject_ext,
}

# One packer, reused. Every value handed to it is a builtin type (or an int
# subclass), so ``pack`` never calls back into Python and runs without
# releasing the GIL: sharing it between threads cannot interleave two frames.
_packer = msgpack.Packer(use_bin_type=True, autoreset=True)


# --------------------------------------------------------------------------- field checks


class _BadField(Exception):
    """Internal: a wire value of the wrong type. Always turned into MalformedMessageError."""


def _type_name(value: object) -> str:
    # Never repr() hostile values: a 1000-deep tuple would blow the recursion limit.
    return "nil" if value is None else type(value).__name__


def _want_int(value: Any) -> Any:
    # ``type() is`` rather than isinstance: bool is an int subclass and must not pass.
    if type(value) is not int:
        raise _BadField(f"expected an integer, got {_type_name(value)}")
    return value


def _want_bool(value: Any) -> Any:
    if type(value) is not bool:
        raise _BadField(f"expected a boolean, got {_type_name(value)}")
    return value


def _want_str(value: Any) -> Any:
    if type(value) is not str:
        raise _BadField(f"expected a string, got {_type_name(value)}")
    return value


def _want_bytes(value: Any) -> Any:
    if type(value) is not bytes:
        raise _BadField(f"expected bytes (msgpack bin), got {_type_name(value)}")
    return value


def _want_opt_bytes(value: Any) -> Any:
    if value is not None and type(value) is not bytes:
        raise _BadField(f"expected bytes (msgpack bin) or nil, got {_type_name(value)}")
    return value


def _want_names(value: Any) -> Any:
    if type(value) is not tuple:
        raise _BadField(f"expected an array of strings, got {_type_name(value)}")
    for item in value:
        if type(item) is not str:
            raise _BadField(f"expected an array of strings, found a {_type_name(item)}")
    return value


def _want_ints(value: Any) -> Any:
    if type(value) is not tuple:
        raise _BadField(f"expected an array of integers, got {_type_name(value)}")
    for item in value:
        if type(item) is not int:
            raise _BadField(f"expected an array of integers, found a {_type_name(item)}")
    return value


def _want_code(value: Any) -> Any:
    if type(value) is not int:
        raise _BadField(f"expected an error code (integer), got {_type_name(value)}")
    try:
        return ErrorCode(value)
    except ValueError:
        raise _BadField(f"unknown error code {value}") from None


def _want_struct(spec: _Spec) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if type(value) is not tuple or len(value) != len(spec.names):
            raise _BadField(
                f"expected a {spec.cls.__name__} as an array of {len(spec.names)} values, "
                f"got {_type_name(value)}" + (f" of {len(value)}" if type(value) is tuple else "")
            )
        return spec.cls(*spec.from_wire(value))

    return convert


def _want_struct_tuple(spec: _Spec) -> Callable[[Any], Any]:
    one = _want_struct(spec)

    def convert(value: Any) -> Any:
        if type(value) is not tuple:
            raise _BadField(f"expected an array of {spec.cls.__name__}, got {_type_name(value)}")
        return tuple(one(item) for item in value)

    return convert


def _struct_to_wire(spec: _Spec) -> Callable[[Any], Any]:
    return spec.to_wire


def _struct_tuple_to_wire(spec: _Spec) -> Callable[[Any], Any]:
    to_wire = spec.to_wire
    return lambda value: tuple(to_wire(item) for item in value)


# --------------------------------------------------------------------------- per-class layout


class _Spec:
    """The wire layout of one dataclass, computed once."""

    __slots__ = ("checks", "cls", "min_arity", "names", "plain_types", "to_wire")

    cls: type
    names: tuple[str, ...]
    checks: tuple[Callable[[Any], Any], ...]
    #: When every field is a bare int/bool/str, their exact types: decoding is
    #: then one type comparison per field with no calls (the hot path).
    plain_types: tuple[type, ...] | None
    to_wire: Callable[[Any], tuple[Any, ...]]
    #: Fields a peer must send: trailing fields marked ``metadata={"wire_optional": True}``
    #: (added in a later minor version) may be missing and take their defaults.
    min_arity: int

    def __init__(self, cls: type) -> None:
        self.cls = cls
        hints = typing.get_type_hints(cls)
        names: list[str] = []
        checks: list[Callable[[Any], Any]] = []
        encoders: list[Callable[[Any], Any] | None] = []
        for f in dataclasses.fields(cls):
            check, encoder = _field_codec(cls, f.name, hints[f.name])
            names.append(f.name)
            checks.append(check)
            encoders.append(encoder)
        self.names = tuple(names)
        self.checks = tuple(checks)
        optional = [f.metadata.get("wire_optional", False) for f in dataclasses.fields(cls)]
        self.min_arity = len(names)
        while self.min_arity and optional[self.min_arity - 1]:
            self.min_arity -= 1
        plain: dict[Callable[[Any], Any], type] = {_want_int: int, _want_bool: bool, _want_str: str}
        self.plain_types = (
            tuple(plain[c] for c in checks) if all(c in plain for c in checks) else None
        )
        self.to_wire = _make_to_wire(self.names, encoders)

    def from_wire(self, values: tuple[Any, ...]) -> tuple[Any, ...] | list[Any]:
        """Type-check (and convert nested values of) one array of wire fields."""
        plain_types = self.plain_types
        if plain_types is not None:
            for want, value in zip(plain_types, values):  # noqa: B905 (arity checked by caller)
                if type(value) is not want:
                    break
            else:
                return values
        out = []
        count = len(values)
        for name, check, value in zip(self.names[:count], self.checks[:count], values, strict=True):
            try:
                out.append(check(value))
            except _BadField as exc:
                raise _BadField(f"{self.cls.__name__}.{name}: {exc}") from None
        return out


def _field_codec(
    cls: type, name: str, hint: object
) -> tuple[Callable[[Any], Any], Callable[[Any], Any] | None]:
    """(wire check, encoder or None for 'as is') for one annotated field."""
    simple: dict[object, Callable[[Any], Any]] = {
        int: _want_int,
        bool: _want_bool,
        str: _want_str,
        bytes: _want_bytes,
        bytes | None: _want_opt_bytes,
        tuple[str, ...]: _want_names,
        tuple[int, ...]: _want_ints,
        ErrorCode: _want_code,
    }
    if hint in simple:
        return simple[hint], None
    if hint is Limits or hint is DeviceInfo:
        assert isinstance(hint, type)
        spec = _spec(hint)
        return _want_struct(spec), _struct_to_wire(spec)
    if hint == tuple[DeviceInfo, ...]:
        spec = _spec(DeviceInfo)
        return _want_struct_tuple(spec), _struct_tuple_to_wire(spec)
    # A developer added a field type the codec does not know: fail loudly, at once.
    raise TypeError(f"the codec cannot encode {cls.__name__}.{name} of type {hint!r}")


def _make_to_wire(
    names: tuple[str, ...], encoders: list[Callable[[Any], Any] | None]
) -> Callable[[Any], tuple[Any, ...]]:
    if any(enc is not None for enc in encoders):
        getters = [operator.attrgetter(n) for n in names]
        pairs = [(g, enc) for g, enc in zip(getters, encoders, strict=True)]
        return lambda obj: tuple(
            enc(get(obj)) if enc is not None else get(obj) for get, enc in pairs
        )
    if not names:
        return lambda obj: ()
    if len(names) == 1:
        get_one = operator.attrgetter(names[0])
        return lambda obj: (get_one(obj),)
    # attrgetter with several names returns the tuple directly: the fast path.
    getter: Callable[[Any], tuple[Any, ...]] = operator.attrgetter(*names)
    return getter


_SPECS: dict[type, _Spec] = {}


def _spec(cls: type) -> _Spec:
    spec = _SPECS.get(cls)
    if spec is None:
        spec = _SPECS[cls] = _Spec(cls)
    return spec


# Build the layouts of every registered message now, so a broken message
# definition fails at import and the first decode pays nothing.
for _cls in MESSAGE_TYPES.values():
    _spec(_cls)


# --------------------------------------------------------------------------- fast path


def _make_fast_decoder(cls: type) -> Callable[[tuple[Any, ...]], Any] | None:
    """A decoder for ``cls`` generated from its declared fields; None unless all are declared.

    It takes the unpacked array ``(TAG, field1, ...)`` and returns the message,
    or None for anything it does not accept (the general path then says why).
    """
    names = [f.name for f in dataclasses.fields(cls)]
    declared = dict(declared_fields(cls))
    if any(name not in declared for name in names):
        return None
    lines = ["def fast(obj):", f"    if len(obj) != {len(names) + 1}:", "        return None"]
    for i, name in enumerate(names):
        test = declared[name].accepts(f"f_{name}", lambda other: f"f_{other}")
        lines.append(f"    f_{name} = obj[{i + 1}]")
        lines.append(f"    if type(f_{name}) is not int or not ({test}):")
        lines.append("        return None")
    lines.append("    msg = _new(_cls)")
    lines += [f"    _set(msg, {name!r}, f_{name})" for name in names]
    lines.append("    return msg")
    env: dict[str, Any] = {"_new": object.__new__, "_set": object.__setattr__, "_cls": cls}
    exec("\n".join(lines), env)  # generated from the declarations, not from input
    fast: Callable[[tuple[Any, ...]], Any] = env["fast"]
    return fast


def _make_fast_encoder(cls: type[Message]) -> Callable[[Any], tuple[Any, ...]]:
    """``msg -> (TAG, field1, ...)`` for ``cls``, generated (no reflection per message)."""
    names = [f.name for f in dataclasses.fields(cls)]
    body = ", ".join([str(cls.TAG)] + [f"msg.{name}" for name in names])
    env: dict[str, Any] = {}
    exec(f"def wire(msg):\n    return ({body},)", env)  # generated, not from input
    wire: Callable[[Any], tuple[Any, ...]] = env["wire"]
    return wire


#: Fast decoders by tag, fast encoders by class: the messages with only declared fields.
_FAST_DECODERS: dict[int, Callable[[tuple[Any, ...]], Any]] = {}
_FAST_ENCODERS: dict[type, Callable[[Any], tuple[Any, ...]]] = {}
for _tag, _cls in MESSAGE_TYPES.items():
    _fast = _make_fast_decoder(_cls)
    if _fast is not None:
        _FAST_DECODERS[_tag] = _fast
        _FAST_ENCODERS[_cls] = _make_fast_encoder(_cls)

#: The message types that have the fast path (for tests and documentation).
FAST_PATH_TYPES: tuple[type[Message], ...] = tuple(_FAST_ENCODERS)


# --------------------------------------------------------------------------- public API


def encode(msg: Message) -> bytes:
    """Encode ``msg`` as one msgpack payload (not length-prefixed).

    Raises :class:`LocalProtocolError` if ``msg`` is not an instance of a
    message class registered in ``MESSAGE_TYPES``.
    """
    wire = _FAST_ENCODERS.get(type(msg))
    if wire is not None:
        return _packer.pack(wire(msg))  # type: ignore[no-any-return]
    return _encode_general(msg)


def _encode_general(msg: Message) -> bytes:
    cls = type(msg)
    if MESSAGE_TYPES.get(getattr(cls, "TAG", -1)) is not cls:
        raise LocalProtocolError(
            f"cannot encode {cls.__name__}: it is not a message type registered in MESSAGE_TYPES"
        )
    spec = _SPECS.get(cls) or _spec(cls)
    return _packer.pack((cls.TAG, *spec.to_wire(msg)))  # type: ignore[no-any-return]


def _describe_unpack_error(exc: Exception) -> str:
    if isinstance(exc, msgpack.ExtraData):
        return "trailing bytes after the message"
    if isinstance(exc, msgpack.StackError):
        return "arrays nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return "a string is not valid UTF-8"
    text = str(exc)
    if "incomplete input" in text:
        return "truncated message"
    return text or type(exc).__name__


def _as_bytes(data: object) -> bytes:
    # A transport may hand over a bytearray or memoryview: copy it once. Anything
    # else is a caller bug, but decode() promises one exception type, so say so.
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    raise MalformedMessageError(f"a frame must be bytes, got {type(data).__name__}")


def decode(data: bytes, *, max_size: int) -> Message:
    """Decode one payload into a validated message.

    ``max_size`` is the largest payload this side accepts (its own
    ``Limits.max_message_size``). Raises :class:`MalformedMessageError` (or
    its subclass :class:`UnknownMessageError`) for anything that is not
    exactly one valid message; never any other exception.
    """
    obj = _unpack(data, max_size)
    if type(obj) is tuple and obj and type(obj[0]) is int:
        fast = _FAST_DECODERS.get(obj[0])
        if fast is not None:
            msg = fast(obj)
            if msg is not None:
                return msg  # type: ignore[no-any-return]
    return _from_wire(obj)


def _decode_general(data: bytes, *, max_size: int) -> Message:
    """:func:`decode` without the fast path: every check, every error."""
    return _from_wire(_unpack(data, max_size))


def _unpack(data: bytes, max_size: int) -> Any:
    if type(data) is not bytes:
        data = _as_bytes(data)
    if len(data) > max_size:
        raise MalformedMessageError(
            f"a {len(data)}-byte message exceeds the {max_size}-byte limit this side announced"
        )
    try:
        return msgpack.unpackb(data, **_UNPACK_OPTIONS)
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        raise MalformedMessageError(f"undecodable message: {_describe_unpack_error(exc)}") from None


def _from_wire(obj: Any) -> Message:
    """The general path from an unpacked frame to a message (or the error)."""
    if type(obj) is not tuple or not obj:
        raise MalformedMessageError(
            f"a message must be a non-empty msgpack array [TAG, fields...], got {_type_name(obj)}"
        )
    tag = obj[0]
    if type(tag) is not int:
        raise MalformedMessageError(f"a message tag must be an integer, got {_type_name(tag)}")

    request_id: int | None = None
    if tag in REQUEST_TAGS and len(obj) > 1:
        rid = obj[1]
        if type(rid) is int and 0 <= rid <= U32:
            request_id = rid

    cls = MESSAGE_TYPES.get(tag)
    if cls is None:
        if tag in REQUEST_TAGS:
            text = f"unknown operation {tag:#04x}"
        else:
            text = f"unknown message type {tag:#x}"
        raise UnknownMessageError(text, tag=tag, request_id=request_id)
    spec = _SPECS.get(cls) or _spec(cls)
    arity = len(spec.names)
    if not spec.min_arity <= len(obj) - 1 <= arity:
        takes = f"{spec.min_arity}-{arity}" if spec.min_arity < arity else str(arity)
        raise MalformedMessageError(
            f"{cls.__name__} (tag {tag:#04x}) takes {takes} fields, got {len(obj) - 1}",
            tag=tag,
            request_id=request_id,
        )
    try:
        return cls(*spec.from_wire(obj[1:]))
    except _BadField as exc:
        # The text already names the class and field ("ConfigReadRequest.size: ...").
        raise MalformedMessageError(str(exc), tag=tag, request_id=request_id) from None
    except LocalProtocolError as exc:
        # The message constructors raise LocalProtocolError; off the wire it
        # is the *peer's* fault. Keep the precise code (INVALID_SIZE, ...).
        raise MalformedMessageError(
            str(exc), tag=tag, request_id=request_id, code=exc.code
        ) from None
