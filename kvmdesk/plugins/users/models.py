"""Request models of the users plugin, with the field rules shared by the API and the import rows."""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, BeforeValidator, Field, StringConstraints

from kvmdesk.api.models import UNPRINTABLE_CLASS, Model, Name, OptionalName, batch_of, name_type

#: What Python's ``\s`` matches, spelt out: the OpenAPI document's patterns are read by other regex
#: dialects (JSON Schema's is ECMA's, whose ``\s`` differs), and must refuse exactly what the code refuses.
_SPACE = r"\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_USER_NAME = re.compile(rf"^[^{_SPACE}{UNPRINTABLE_CLASS}/\\]+$")
_PHONE = re.compile(r"^[0-9+\-() ]*$")
_EMAIL = re.compile(rf"^$|^[^@{_SPACE}]+@[^@{_SPACE}]+\.[^@{_SPACE}]+$")
#: Argon2 handles any length; the bound only keeps a request from being a hashing load test.
PASSWORD_MAX = 128


def _shown(pattern: re.Pattern) -> Any:
    """The OpenAPI document shows a rule of :func:`_matching` as the field's ``pattern``."""
    return Field(json_schema_extra={"pattern": pattern.pattern})


def _matching(pattern: re.Pattern, reason: str) -> AfterValidator:
    def check(value: str) -> str:
        if not pattern.match(value):
            raise ValueError(reason)
        return value

    return AfterValidator(check)


def _flag(value: Any) -> Any:
    """The contract sends ``"enabled": 1``; accept 1/0 as well as true/false, nothing else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError("expected true/false or 1/0")


def _blank(value: Any) -> Any:
    return "" if value is None else value


Flag = Annotated[bool, BeforeValidator(_flag)]
_NAME_RULE = _matching(_USER_NAME, "must not contain spaces, control characters, / or \\")
UserName = Annotated[Name, _NAME_RULE, _shown(_USER_NAME)]
Prefix = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=48), _NAME_RULE,
                   _shown(_USER_NAME)]
GroupName = Name
FileName = name_type(100)
Password = Annotated[str, StringConstraints(min_length=1, max_length=PASSWORD_MAX)]
PersonName = Annotated[OptionalName, BeforeValidator(_blank)]
Phone = Annotated[str, BeforeValidator(_blank), StringConstraints(strip_whitespace=True, max_length=32),
                 _matching(_PHONE, "only digits, spaces and + - ( ) are allowed"), _shown(_PHONE)]
Email = Annotated[str, BeforeValidator(_blank), StringConstraints(strip_whitespace=True, max_length=128),
                 _matching(_EMAIL, "not an e-mail address"), _shown(_EMAIL)]
Desc = Annotated[str, BeforeValidator(_blank), StringConstraints(max_length=1024)]


# -- user groups -------------------------------------------------------------------------------------


class GroupCreate(Model):
    name: GroupName
    group_type: Literal[2]
    desc: Desc = ""


class GroupRef(Model):
    """One group of a batch: the uuid identifies it; the name is informative only."""

    uuid: str
    name: Optional[OptionalName] = None


class GroupDelete(Model):
    groups: batch_of(GroupRef)


class GroupValue(Model):
    name: GroupName
    desc: Optional[Desc] = None


class GroupEdit(Model):
    uuid: str
    name: Optional[OptionalName] = None
    value: GroupValue


# -- users -------------------------------------------------------------------------------------------


class UserRef(Model):
    """One user of a batch: the uuid identifies it; the user name is informative only."""

    uuid: str
    user_name: Optional[OptionalName] = None


class UserCreate(Model):
    group_uuid: str
    user_name: UserName
    passwd: Password
    name: PersonName = ""
    phone: Phone = ""
    email: Email = ""
    enabled: Flag = True


class MultiCreate(Model):
    group_uuid: str
    prefix: Prefix
    postfix: int = Field(ge=1, le=10)
    postfix_start: int = Field(default=1, ge=0)
    user_num: int = Field(ge=1)
    passwd: Password
    enabled: Flag = True


class UsersParam(Model):
    users: batch_of(UserRef)


class MoveParam(Model):
    group_uuid: str
    group_name: Optional[OptionalName] = None
    users: batch_of(UserRef)


class ExportParam(Model):
    filename: FileName
    users: batch_of(UserRef)


class UserValue(Model):
    """New attributes of a user.  ``passwd`` empty or absent keeps the password (responses never carry it)."""

    group_uuid: str
    user_name: UserName
    passwd: Optional[Annotated[str, StringConstraints(max_length=PASSWORD_MAX)]] = None
    name: Optional[PersonName] = None
    phone: Optional[Phone] = None
    email: Optional[Email] = None
    enabled: Optional[Flag] = None


class UserUpdate(Model):
    uuid: str
    user_name: Optional[OptionalName] = None
    value: UserValue


# -- import rows ---------------------------------------------------------------------------------------


def _empty_to_none(value: Any) -> Any:
    return None if value == "" else value


class ImportRow(Model):
    """One row of an imported sheet, after the cells were turned into text.

    ``passwd`` may be empty: the user is created without a password and cannot log in until an
    administrator sets one (exports never contain passwords, so a round trip has none).
    """

    user_name: UserName
    passwd: Annotated[Optional[Annotated[str, StringConstraints(max_length=PASSWORD_MAX)]], AfterValidator(_empty_to_none)] = None
    name: PersonName = ""
    group: GroupName
    phone: Phone = ""
    email: Email = ""
    enabled: Optional[bool] = None
