"""The documented name rules and free-text limits (services/common/names.py), with the messages a user reads."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument, InvalidName
from services.common.names import (
    COMMIT_NAME_MAX,
    DESCRIPTION_MAX_BYTES,
    VM_LABEL_KEY_MAX,
    VM_LABEL_VALUE_MAX_BYTES,
    VM_LABELS_MAX,
    normalize_host,
    normalize_suffix,
    require_uuid,
    validate_label,
    validate_org_name,
    validate_repo_name,
    validate_tag_name,
    validate_text,
    validate_vm_labels,
)

ALLOWED = "use 1-64 characters of A-Z, a-z, 0-9, '.', '_' and '-'"


@pytest.mark.parametrize("name", ["a", "my-app", "My_App.v2", "..x", ".hidden", "x" * 64, "0"])
def test_names_of_allowed_characters_pass_unchanged(name: str) -> None:
    assert validate_repo_name(name) == name
    assert validate_org_name(name) == name
    assert validate_tag_name(name) == name


def test_tags_may_be_longer_than_repositories() -> None:
    assert validate_tag_name("t" * 128) == "t" * 128
    with pytest.raises(InvalidName, match=r"^repository name 'rrr.*' is 65 characters long: " + ALLOWED + "$"):
        validate_repo_name("r" * 65)
    with pytest.raises(InvalidName, match=r"^tag name 'ttt.*' is 129 characters long: use 1-128 characters"):
        validate_tag_name("t" * 129)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "is empty"),
        ("my app", "contains ' '"),
        ("a/b", "contains '/'"),
        ("ü:ö", "contains ':', 'ö', 'ü'"),  # each character once, sorted
        ("a\nb", r"contains '\\n'"),
    ],
)
def test_a_bad_name_says_what_is_wrong_and_the_rule(name: str, problem: str) -> None:
    with pytest.raises(InvalidName) as refused:
        validate_repo_name(name)
    assert str(refused.value) == f"repository name {name!r} {problem.replace(chr(92) * 2, chr(92))}: {ALLOWED}"
    assert isinstance(refused.value, InvalidArgument)  # a 400 at the gateway


@pytest.mark.parametrize("name", [".", "..", "..."])
def test_names_of_only_dots_are_refused_as_paths_would_read_them(name: str) -> None:
    with pytest.raises(InvalidName, match=r"is only dots, which paths read as the folder itself or its parent: use 1-128 characters"):
        validate_tag_name(name)


def test_a_long_name_of_only_dots_is_refused_for_its_length() -> None:
    with pytest.raises(InvalidName, match=r"is 65 characters long"):
        validate_repo_name("." * 65)


def test_free_text_is_limited_in_utf8_bytes() -> None:
    assert validate_text("description", "x" * DESCRIPTION_MAX_BYTES) == "x" * DESCRIPTION_MAX_BYTES
    with pytest.raises(InvalidArgument, match=r"^description is 4098 bytes long: it may be at most 4096 bytes \(UTF-8\); shorten it$"):
        validate_text("description", "é" * 2049)  # 2049 characters, two bytes each
    assert validate_label("name", "n" * COMMIT_NAME_MAX, COMMIT_NAME_MAX) == "n" * COMMIT_NAME_MAX
    with pytest.raises(InvalidArgument, match=r"^name is 257 characters long: it may be at most 256 characters; shorten it$"):
        validate_label("name", "n" * (COMMIT_NAME_MAX + 1), COMMIT_NAME_MAX)


def test_vm_labels_are_limited_in_count_key_and_value() -> None:
    most = {f"k{i}": "v" for i in range(VM_LABELS_MAX)}
    assert validate_vm_labels(most) == most
    with pytest.raises(InvalidArgument, match=rf"^labels has {VM_LABELS_MAX + 1} entries: a VM may have at most {VM_LABELS_MAX} labels$"):
        validate_vm_labels({**most, "one-more": "v"})
    with pytest.raises(InvalidArgument, match=r"^labels: a label's key may not be empty$"):
        validate_vm_labels({"": "v"})
    with pytest.raises(InvalidArgument, match=rf"^label key 'kkk.*' is {VM_LABEL_KEY_MAX + 1} characters long"):
        validate_vm_labels({"k" * (VM_LABEL_KEY_MAX + 1): "v"})
    with pytest.raises(InvalidArgument, match=rf"^label 'k' is {VM_LABEL_VALUE_MAX_BYTES + 1} bytes long"):
        validate_vm_labels({"k": "v" * (VM_LABEL_VALUE_MAX_BYTES + 1)})


@pytest.mark.parametrize(
    ("header", "host"),
    [
        ("App.Vers.Localhost", "app.vers.localhost"),
        ("app.vers.localhost:8080", "app.vers.localhost"),
        ("app.vers.localhost.", "app.vers.localhost"),
        (" app.example:443 ", "app.example"),
        ("app.example:http", "app.example:http"),  # not a port: left for the domain lookup to refuse
        ("[::1]:8080", "[::1]"),
        ("[::1]", "[::1]"),
    ],
)
def test_host_headers_are_compared_as_names(header: str, host: str) -> None:
    assert normalize_host(header) == host


def test_domain_suffixes_are_compared_without_dots_or_case() -> None:
    assert normalize_suffix(" .Vers.Localhost. ") == "vers.localhost"


def test_ids_are_uuids_in_lowercase() -> None:
    upper = "0F8FAD5B-D9CB-469F-A165-70867728950E"
    assert require_uuid(upper, "commit ID") == upper.lower()
    with pytest.raises(InvalidArgument, match=r"^commit ID 'latest' is not a valid ID \(a UUID\); did you mean a tag\?$"):
        require_uuid("latest", "commit ID", "; did you mean a tag?")
    with pytest.raises(InvalidArgument, match=r"^VM ID 'xxxx.*' is not a valid ID"):
        require_uuid("x" * 1000, "VM ID")
