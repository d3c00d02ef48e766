class Net(nn.Module):
    def __init__(self, in_shape=(3, 32, 32), num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(in_shape[0], 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.conv(x)), 1))


self.fc = nn.Linear(16, 10)
