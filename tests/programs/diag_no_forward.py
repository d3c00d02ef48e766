class Net(nn.Module):
    def __init__(self, in_shape=(3, 32, 32), num_classes=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_shape[0], 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(16, num_classes)


def forward(self, x):
    return self.fc(torch.flatten(self.features(x), 1))
