from keras_hydra import cli


def test_quick_demo_prints_every_row(capsys):
    cli.main(["demo", "--quick"])
    out = capsys.readouterr().out
    assert (
        "| method | accuracy | NLL | OOD AUROC (MI) | OOD AUROC (entropy) | params |"
        in out
    )
    rows = {
        line.split("|")[1].strip(): line
        for line in out.splitlines()
        if line.startswith("| ")
    }
    assert {"ensemble", "hydra", "kd"} <= set(rows)
    for name in ["ensemble", "hydra"]:
        cells = [c.strip() for c in rows[name].split("|")[2:-1]]
        assert all(0.0 <= float(c) for c in cells[:4]), cells
    assert rows["kd"].split("|")[4].strip() == "-"  # one head: no mutual information
    assert out.count("hydra phase") == 2
