"""The ChestX-ray14 label set in the paper's order, and the classes NIH annotated with boxes."""

CLASS_NAMES = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NUM_CLASSES = len(CLASS_NAMES)
CLASS_INDEX = {name: index for index, name in enumerate(CLASS_NAMES)}

# The 8 classes with boxes in BBox_List_2017.csv (NIH writes 'Infiltrate' there for 'Infiltration').
BOX_CLASS_NAMES = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
)
BOX_CLASS_INDICES = tuple(CLASS_INDEX[name] for name in BOX_CLASS_NAMES)

# Spellings in NIH's files that name one of CLASS_NAMES.
LABEL_ALIASES = {"Infiltrate": "Infiltration", "Pleural Thickening": "Pleural_Thickening"}
NO_FINDING = "No Finding"
