"""`bonneville image build|ls|prune`: the guest kernel and initramfs every VM boots."""

from __future__ import annotations

import json

import click


@click.group("image")
def image() -> None:
    """Manage the guest image (kernel + initramfs with the agent)."""


@image.command("build")
@click.option("--force", is_flag=True, help="rebuild even if the current image is up to date")
def build(force: bool) -> None:
    """Build the guest image (cached under /var/lib/bonneville; rebuilt when inputs change)."""
    from bonneville.backends.image import build_image

    result = build_image(force=force)
    click.echo(f"guest image {result.key[:12]}: {result.kernel} {result.initrd}")


@image.command("ls")
def ls() -> None:
    """Show the current guest image."""
    from bonneville.backends.image import image_status

    click.echo(json.dumps(image_status(), indent=2))


@image.command("prune")
def prune() -> None:
    """Remove every cached guest image but the current one. A running VM no longer needs the
    files it booted from; a create racing this may fail, so prune when upgrading."""
    from bonneville.backends.image import prune_images

    for key in prune_images():
        click.echo(key)


COMMANDS = [image]
