"""The function's container image: a tag derived from the code that goes in, and on real AWS a
check that the image was built and pushed before the function is pointed at it."""
from __future__ import annotations

import hashlib
from pathlib import Path

from barkgpt.deploy.aws import AwsTarget
from barkgpt.errors import BarkError
from barkgpt.params import DeployParams

# What goes into the function image; its hash tags the image so new code means a new image.
IMAGE_SOURCES = ("barkgpt/**/*", "pyproject.toml", "constraints.txt", "scripts/install.sh", "deploy/Dockerfile")


def code_hash(root: Path | None = None) -> str:
    """sha256 over the image's source files (path + bytes), for a content-addressed image tag.

    The sources are those of the running barkgpt (its checkout), not of the data project root."""
    import barkgpt

    root = root or Path(barkgpt.__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for pattern in IMAGE_SOURCES:
        for path in sorted(root.glob(pattern)):
            if "__pycache__" in path.parts or not path.is_file():
                continue
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def image_uri(cfg: DeployParams, target: AwsTarget) -> str:
    if cfg.image_uri:
        return cfg.image_uri
    return f"{target.account_id}.dkr.ecr.{target.region}.amazonaws.com/{cfg.image_repository}:{code_hash()}"


def check_image(target: AwsTarget, uri: str) -> None:
    """On real AWS the image must already be in ECR (built by deploy/Dockerfile and pushed)."""
    if target.emulated or "@" in uri or ".dkr.ecr." not in uri:
        return  # emulators run no images; digests and foreign registries are taken as given
    repo, tag = uri.split("/", 1)[1].rsplit(":", 1)
    try:
        target.client("ecr").describe_images(repositoryName=repo, imageIds=[{"imageTag": tag}])
    except Exception as err:
        raise BarkError(f"image {uri} is not in ECR ({type(err).__name__}); build and push it first:\n"
                        f"  docker build -f deploy/Dockerfile -t {uri} .\n  docker push {uri}\n"
                        "(docs/deploy.md, 'Build the image')") from None
