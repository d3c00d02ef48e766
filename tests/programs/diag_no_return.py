class Net(nn.Module):
    def __init__(self, in_shape=(3, 32, 32), num_classes=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_shape[0], 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(x, 1)
        logits = self.fc(x)  # noqa: F841 - the real failure: computed, never returned
