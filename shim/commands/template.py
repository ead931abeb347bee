"""`bonneville template build|ls|rm|prune`: the pre-booted VMs that QEMU containers are cloned from.

Templates are built on first use anyway; `build` makes them ahead of time (install.sh builds the
two docker needs by default: no NIC and one NIC, 256 MiB, 1 vCPU).
"""

from __future__ import annotations

import click

DEFAULT_MEMORY_MIB = 256


@click.group("template")
def template() -> None:
    """Manage the QEMU backend's VM templates (instant clone)."""


@template.command("build")
@click.option("--memory", "memory_mib", type=click.IntRange(64), default=DEFAULT_MEMORY_MIB)
@click.option("--vcpus", type=click.IntRange(1), default=1, show_default=True)
@click.option(
    "--nics",
    type=click.IntRange(0, 8),
    multiple=True,
    help="NIC count (repeatable; default: 0 and 1)",
)
def build(memory_mib: int, vcpus: int, nics: tuple[int, ...]) -> None:
    """Build the templates for VMs of this shape, unless they exist."""
    from bonneville.backends.qemu import template as templates
    from bonneville.backends.qemu.backend import QemuBackend

    backend = QemuBackend()
    for count in nics or (0, 1):
        spec = backend.template_for(memory_mib, vcpus, count)
        result, built = templates.ensure(spec, backend.build_template)
        seconds = result.manifest.get("build_seconds")
        what = f"built in {seconds} s" if built else "up to date"
        click.echo(f"template {result.key}: {memory_mib} MiB, {vcpus} vCPU, {count} NIC: {what}")


@template.command("ls")
@click.option("--quiet", "-q", is_flag=True, help="keys only")
def ls(quiet: bool) -> None:
    """List the templates on this host."""
    from bonneville.backends.qemu import template as templates

    found = templates.list_templates()
    if quiet:
        for t in found:
            click.echo(t.key)
        return
    click.echo(f"{'KEY':<34}{'MEMORY':>8}{'VCPUS':>7}{'NICS':>6}{'DISK':>9}  CREATED")
    for t in found:
        m = t.manifest
        disk = f"{t.disk_usage() / 2**20:.0f}M"
        click.echo(
            f"{t.key:<34}{m.get('memory_mib', '?'):>7}M{m.get('vcpus', '?'):>7}"
            f"{m.get('nics', '?'):>6}{disk:>9}  {m.get('created', '?')}"
        )


@template.command("rm")
@click.option("--all", "remove_all", is_flag=True, help="remove every template")
@click.argument("keys", nargs=-1)
def rm(remove_all: bool, keys: tuple[str, ...]) -> None:
    """Remove templates (running clones are not affected)."""
    from bonneville.backends.qemu import template as templates

    if remove_all:
        keys = tuple(t.key for t in templates.list_templates())
    elif not keys:
        raise click.UsageError("name the templates to remove, or --all")
    for key in keys:
        templates.remove(key)
        click.echo(key)


@template.command("prune")
def prune() -> None:
    """Remove the templates no container can use any more (built from a guest image or a QEMU
    that has since been replaced)."""
    from bonneville.backends.qemu import template as templates

    for key, reason in templates.prune():
        click.echo(f"{key}: {reason}")


COMMANDS = [template]
