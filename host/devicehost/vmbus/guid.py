"""The Windows-layout GUID of every VMBus offer and of hvsocket service ids (facts §1).

Byte layout (16 bytes, what travels on the wire)::

    off size field
      0    4 data1  u32 little-endian
      4    2 data2  u16 little-endian
      6    2 data3  u16 little-endian
      8    8 data4  raw bytes

which is exactly :attr:`uuid.UUID.bytes_le`. The text form is lowercase
``xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`` without braces; the parser also takes the 38-character
form in braces and hex digits of either case.
"""

from __future__ import annotations

import enum
import os
import struct
import uuid
from typing import ClassVar, Final

import attrs

from devicehost.excerpt import excerpt

__all__ = ["Guid", "GuidError", "GuidErrorKind"]

# Byte layout: data1 u32 LE @0, data2 u16 LE @4, data3 u16 LE @6, data4 8 bytes @8.
_FIELDS: Final = struct.Struct("<IHH8s")
_HEX: Final = frozenset("0123456789abcdefABCDEF")
_HYPHENS: Final = (8, 13, 18, 23)


class GuidErrorKind(enum.Enum):
    """Why a GUID could not be parsed."""

    LENGTH = "length"  # not 36 characters, nor 38 in braces (or not 16 bytes)
    FORMAT = "format"  # braces or hyphens where they do not belong
    DIGIT = "digit"  # a character that should be a hex digit is not


class GuidError(ValueError):
    """Raised when text or bytes are not a GUID; the input's provider is to blame."""

    def __init__(self, kind: GuidErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _to_16_bytes(value: bytes | bytearray | memoryview) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"a GUID is made of bytes, not {type(value).__name__}")
    data = bytes(value)
    if len(data) != 16:
        raise GuidError(GuidErrorKind.LENGTH, f"a GUID is 16 bytes, got {len(data)}")
    return data


@attrs.frozen(order=True)
class Guid:
    """A GUID held as its 16 wire bytes (Windows layout == ``uuid.UUID.bytes_le``)."""

    bytes_le: bytes = attrs.field(converter=_to_16_bytes)

    ZERO: ClassVar[Guid]

    # -- constructors ----------------------------------------------------------------------------

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Guid:
        """The GUID whose wire bytes are ``data`` (exactly 16 bytes, else a LENGTH error)."""
        return cls(bytes(data))

    @classmethod
    def from_fields(cls, data1: int, data2: int, data3: int, data4: bytes) -> Guid:
        """The GUID with the given fields (data4 is 8 raw bytes)."""
        if len(data4) != 8:
            raise GuidError(GuidErrorKind.LENGTH, "data4 of a GUID is 8 bytes")
        return cls(_FIELDS.pack(data1, data2, data3, bytes(data4)))

    @classmethod
    def from_uuid(cls, value: uuid.UUID) -> Guid:
        return cls(value.bytes_le)

    @classmethod
    def parse(cls, text: str) -> Guid:
        """Parse the 36-character text form, or the 38-character form wrapped in braces.

        Raises :class:`GuidError` with kind LENGTH, FORMAT (misplaced braces or hyphens) or DIGIT.
        """
        if len(text) == 38:
            if text[0] != "{" or text[-1] != "}":
                raise GuidError(GuidErrorKind.FORMAT, f"{text!r}: 38-character GUID not in braces")
            body = text[1:-1]
        elif len(text) == 36:
            body = text
        else:
            raise GuidError(
                GuidErrorKind.LENGTH, f"{excerpt(text)}: a GUID has 36 characters (38 in braces)"
            )
        for i, ch in enumerate(body):
            if i in _HYPHENS:
                if ch != "-":
                    raise GuidError(GuidErrorKind.FORMAT, f"{text!r}: expected '-' at {i}")
            elif ch not in _HEX:
                raise GuidError(GuidErrorKind.DIGIT, f"{text!r}: {ch!r} is not a hex digit")
        return cls(uuid.UUID(hex=body.replace("-", "")).bytes_le)

    @classmethod
    def new_random(cls) -> Guid:
        """A random version-4 GUID."""
        return cls(uuid.UUID(bytes=os.urandom(16), version=4).bytes_le)

    # -- views -----------------------------------------------------------------------------------

    @property
    def data1(self) -> int:
        return int(_FIELDS.unpack(self.bytes_le)[0])

    @property
    def data2(self) -> int:
        return int(_FIELDS.unpack(self.bytes_le)[1])

    @property
    def data3(self) -> int:
        return int(_FIELDS.unpack(self.bytes_le)[2])

    @property
    def data4(self) -> bytes:
        return self.bytes_le[8:]

    def to_uuid(self) -> uuid.UUID:
        return uuid.UUID(bytes_le=self.bytes_le)

    def is_zero(self) -> bool:
        return self.bytes_le == bytes(16)

    def upper(self) -> str:
        """The text form in uppercase hex digits."""
        return str(self).upper()

    def __bytes__(self) -> bytes:
        return self.bytes_le

    def __str__(self) -> str:
        return str(self.to_uuid())

    def __repr__(self) -> str:
        return f"Guid('{self}')"


Guid.ZERO = Guid(bytes(16))
