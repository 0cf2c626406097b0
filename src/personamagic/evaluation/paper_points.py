"""The paper's published T-Sim / I-Pre numbers, drawn as reference markers and shown beside ours.

Source: X. Li, J. Zhan, S. He, Y. Xu, J. Dong, H. Zhang, Y. Du, "PersonaMagic: Stage-Regulated
High-Fidelity Face Customization with Tandem Equilibrium", AAAI 2025 (copied from the text of the
paper and its appendix). Scales: T-Sim is the paper's CLIPScore (its values match CLIP-S = 2.5 *
max(cos, 0), see `text_similarity`); I-Pre is MTCNN + CosFace cosine with no face -> -1.
Each value is (T-Sim, I-Pre).
"""

from __future__ import annotations

PAPER = "Li et al., PersonaMagic (AAAI 2025)"

# Table 6 (appendix): Stable Diffusion v1.4; Textual Inversion on LDM ("superior to SD", says the caption).
# The same points as the paper's Fig. 8.
TABLE6 = {
    "CelebA-HQ": {
        "Textual Inversion": (0.685, -0.053),
        "DreamBooth": (0.679, 0.380),
        "Custom Diffusion": (0.738, 0.283),
        "Perfusion": (0.708, -0.073),
        "NeTI": (0.625, 0.329),
        "PersonaMagic": (0.747, 0.345),
    },
    "FFHQ": {
        "Textual Inversion": (0.694, -0.023),
        "DreamBooth": (0.652, 0.465),
        "Custom Diffusion": (0.749, 0.281),
        "Perfusion": (0.704, -0.027),
        "NeTI": (0.622, 0.425),
        "PersonaMagic": (0.747, 0.407),
    },
    "LFW": {
        "Textual Inversion": (0.666, 0.022),
        "DreamBooth": (0.756, 0.146),
        "Custom Diffusion": (0.745, 0.179),
        "Perfusion": (0.699, -0.006),
        "NeTI": (0.641, 0.227),
        "PersonaMagic": (0.751, 0.278),
    },
}

# Table 1: ablation on CelebA-HQ (one-shot) and LFW (few-shot), SD v1.4.
TABLE1 = {
    "CelebA-HQ": {
        "Custom Diffusion": (0.737, 0.283),
        "Vanilla": (0.610, 0.334),
        "+Stage Regulation": (0.672, 0.363),
        "+Tandem Equilibrium": (0.691, 0.284),
        "PersonaMagic": (0.744, 0.358),
    },
    "LFW": {
        "Custom Diffusion": (0.744, 0.179),
        "Vanilla": (0.631, 0.226),
        "+Stage Regulation": (0.665, 0.289),
        "+Tandem Equilibrium": (0.668, 0.206),
        "PersonaMagic": (0.753, 0.278),
    },
}

# Table 2: stage-partition thresholds (lambda1, lambda2) on CelebA-HQ.
TABLE2 = {
    "CelebA-HQ": {
        (0.5, 1.0): (0.691, 0.284),
        (0.6, 1.0): (0.727, 0.307),
        (0.7, 1.0): (0.744, 0.328),
        (0.8, 1.0): (0.749, 0.302),
        (0.7, 0.9): (0.741, 0.328),
        (0.7, 0.8): (0.744, 0.358),
    },
}

# Table 3: as a plug-in of pre-trained personalization models, on 25 people the authors collected (unseen by
# PhotoMaker and IP-Adapter), 40 prompts, 4 images each.
TABLE3 = {
    "non-celebrities": {
        "PhotoMaker": (0.775, 0.335),
        "PhotoMaker w/ ours": (0.790, 0.352),
        "IP-Adapter": (0.762, 0.348),
        "IP-Adapter w/ ours": (0.778, 0.359),
    },
}

TABLES = {"table1": TABLE1, "table2": TABLE2, "table3": TABLE3, "table6": TABLE6}


def paper_dataset(name: str) -> str | None:
    """The paper's dataset column a dataset name refers to ("celeba_hq" -> "CelebA-HQ"), or None."""
    key = "".join(ch for ch in name.lower() if ch.isalnum())
    for table in TABLES.values():
        for dataset in table:
            if key == "".join(ch for ch in dataset.lower() if ch.isalnum()):
                return dataset
    return None


def paper_value(table: str, dataset: str | None, row) -> tuple[float, float] | None:
    """(T-Sim, I-Pre) of `row` in the paper's `table` for `dataset`, or None when not published."""
    if dataset is None:
        return None
    return TABLES[table].get(dataset, {}).get(row)
