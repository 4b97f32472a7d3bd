"""kubectl's -o formats on the CLI's records: JSONPath, custom-columns and the format names."""

from __future__ import annotations

import pytest

from services.kubectl_runs import output

RECORD = [
    {"name": "a", "width": {"allocated": 8, "desired": 16}, "domains": ["x", "y"], "eta": None},
    {"name": "b", "width": {"allocated": 0, "desired": 32}, "domains": [], "eta": "in 2h"},
]


def test_jsonpath_fields_wildcards_indexes_and_range() -> None:
    assert output.jsonpath("{[*].name}", RECORD) == "a b"
    assert output.jsonpath("{[0].width.desired}", RECORD) == "16"
    assert output.jsonpath("{[-1].name}", RECORD) == "b"
    assert output.jsonpath("{[0:1].name}", RECORD) == "a"
    assert output.jsonpath("{..allocated}", RECORD) == "8 0"
    assert output.jsonpath("{[0]['domains']}", RECORD) == '["x","y"]'
    assert output.jsonpath("[*].name", RECORD) == "a b"  # braces are optional
    text = output.jsonpath('{range [*]}{.name}{"\\t"}{.width.desired}{"\\n"}{end}', RECORD)
    assert text == "a\t16\nb\t32\n"
    assert output.jsonpath("{.missing}", {"a": 1}) == ""
    assert output.jsonpath("{.eta}", RECORD[0]) == ""  # null prints as nothing
    assert output.custom_columns("ETA:.eta", RECORD) == (["ETA"], [[output.NONE], ["in 2h"]])


@pytest.mark.parametrize(
    "template", ["{.a", "{range [*]}{.name}", "{end}", "{[?(@.a==1)]}", "{[x]}", "{.a b}"]
)
def test_bad_templates_say_what_is_wrong(template: str) -> None:
    with pytest.raises(output.OutputError):
        output.jsonpath(template, RECORD)


def test_custom_columns() -> None:
    headers, rows = output.custom_columns(
        "NAME:.name,GPUS:.width.desired,WHERE:.domains[*]", RECORD
    )
    assert headers == ["NAME", "GPUS", "WHERE"]
    assert rows == [["a", "16", "x,y"], ["b", "32", output.NONE]]
    with pytest.raises(output.OutputError, match="HEADER:JSONPATH"):
        output.custom_columns("NAME", RECORD)


def test_format_names_accept_templates_for_argparse() -> None:
    assert "wide" in output.FORMATS and "jsonpath={.name}" in output.FORMATS
    assert "jsonpath=" not in output.FORMATS and "xml" not in output.FORMATS
    assert output.Output.parse("custom-columns=A:.a") == output.Output("custom-columns", "A:.a")
    assert output.Output.parse("wide").tabular and not output.Output.parse("json").tabular
