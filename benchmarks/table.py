"""What every preset writes: its records as JSON and as a markdown table, and the cells its tables share."""
import json
import os


def write_records(out_dir, stem, meta, records, markdown):
    """out_dir/stem.json ({meta, records}) and out_dir/stem.md (markdown: the heading, notes and table)."""
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(markdown)


def markdown_table(columns, rows):
    """columns: the header's cells; rows: one list of cell strings each, in the columns' order."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def status_cell(r):
    """"ok", else the status with its reason: "skipped: cache of 4.00 GiB does not fit"."""
    return r["status"] if r["status"] == "ok" else f"{r['status']}: {r['note']}"


def fmt_bytes(n):
    if n is None:
        return ""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
