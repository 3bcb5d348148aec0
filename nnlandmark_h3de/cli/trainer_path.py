"""`nnLandmark_trainer_path`: the folder to put in nnU-Net's `nnUNet_extTrainer`."""
from nnlandmark_h3de.training.trainer_folder import trainer_folder


def main():
    print(trainer_folder())


if __name__ == "__main__":
    main()
