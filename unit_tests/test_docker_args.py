"""docker-run ARGS: what wormhole runs, and what it refuses."""

import pytest

from wormhole.docker_args import RunArgsError, RunSpec, parse_run_args
from wormhole.spec import SpecError, parse


def test_image_only():
    assert parse_run_args("wormhole/mysql") == RunSpec("wormhole/mysql")


def test_options_and_command():
    spec = parse_run_args("-d --rm --name db -e A=1 --env=B=two -v /src:/dst:ro -eC "
                          "-w /work -u 1000 --label x=y --entrypoint /bin/sh img:1.0 -c 'echo hi'")
    assert spec == RunSpec(image="img:1.0", command=("-c", "echo hi"), name="db", env=("A=1", "B=two", "C"),
                           volumes=("/src:/dst:ro",), workdir="/work", user="1000", entrypoint="/bin/sh",
                           labels=("x=y",), remove=True)


def test_options_after_the_image_belong_to_the_command():
    assert parse_run_args("img --name x").command == ("--name", "x")


@pytest.mark.parametrize("text,msg", [
    ("-p 80:80 img", "unknown option '-p'; wormhole supports"),
    ("--privileged img", "unknown option '--privileged'"),
    ("--name", "needs a value"),
    ("--name a/b img", "bad container name"),
    ("-e 1A=2 img", "bad environment variable"),
    ("-v nocolon img", "bad volume"),
    ("--rm=true img", "takes no value"),
    ("--rm", "no image given"),
    ("'unclosed img", "No closing quotation"),
])
def test_refused(text, msg):
    with pytest.raises(RunArgsError, match=msg):
        parse_run_args(text)


def test_the_grammar_refuses_bad_docker_run_args():
    with pytest.raises(SpecError, match="unknown option '-p'"):
        parse(["url", ":80", "tail", "docker-run", "-p 80:80 img"])
    parse(["url", ":80", "tail", "docker-run", "--name web -e X=1 img"])
